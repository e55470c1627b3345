"""A causal LM directory of a language-model family (LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM, ...): keys `model.*` and `lm_head.*`, the family chosen by model_type."""

from __future__ import annotations

from megamm.config import LanguageConfig
from megamm.convert import ConversionError
from megamm.convert.adapters.base import Adapter
from megamm.convert.hf_config import HfExtras, hf_config, raise_problems
from megamm.convert.hf_keys import rename
from megamm.models.decoders import family_for_hf_type, supported_hf_types

PREFIXES = (("model.", "text."), ("lm_head.", "text.lm_head."))


def language_config_from_hf(tree: dict, where: str) -> tuple[LanguageConfig, HfExtras]:
    """A causal LM config tree -> (LanguageConfig with image_token_id still to be set, extras)."""
    family = family_for_hf_type(tree.get("model_type"))
    if family is None:
        raise ConversionError(f"{where}: unsupported language architecture {tree.get('model_type')!r}; supported: "
                              f"{', '.join(supported_hf_types())}")
    cfg = hf_config(tree, where)
    problems: list[str] = []
    language = family.config_from_hf(cfg, where, problems)
    raise_problems(problems)
    return language, HfExtras.from_hf(cfg, family.kept_fields(cfg))


class CausalLmAdapter(Adapter):
    name = "causal-lm"

    def canonical_name(self, key: str) -> str | None:
        return rename(key, PREFIXES)


ADAPTER = CausalLmAdapter()
