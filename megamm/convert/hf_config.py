"""What every Hugging Face adapter shares about config.json: reading it through transformers' own
config classes, the checks several layouts make (the model type, a special token inside the
vocabulary, LLaVA-style image features), and the fields an export gives back.

Reading goes through `AutoConfig.for_model`, because a saved config.json usually lists only the
fields that differ from the class defaults (llava-hf's text config names little more than the
vocabulary size): the defaults of the installed transformers are the ones the file was written
against. The mapping of each architecture lives in its adapter (megamm.convert.adapters) and in the
families it composes (megamm.models.towers, megamm.models.decoders).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from megamm.convert import ConversionError


@dataclass
class HfExtras:
    """Hugging Face fields megamm does not use but an export should give back (megamm.json "hf")."""

    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Mistral's window, kept when it covers every position (megamm.models.decoders.mistral).
    sliding_window: int | None = None
    # The Qwen2-VL family's <|vision_start|> / <|vision_end|> ids (the chat template's, not the model's).
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, tree: dict | None) -> HfExtras:
        """The fields of an import's record (older records also hold keys read elsewhere)."""
        tree = tree or {}
        return cls(**{f.name: tree[f.name] for f in fields(cls) if f.name in tree})

    @classmethod
    def from_hf(cls, cfg: Any, kept: dict) -> HfExtras:
        """The token ids of a transformers text config plus a family's `kept_fields`."""
        return cls(pad_token_id=getattr(cfg, "pad_token_id", None), bos_token_id=getattr(cfg, "bos_token_id", None),
                   eos_token_id=getattr(cfg, "eos_token_id", None), **kept)


def hf_config(tree: dict, where: str) -> Any:
    """A transformers config object for `tree` (defaults filled in by the installed transformers)."""
    from transformers import AutoConfig

    tree = dict(tree)
    model_type = tree.pop("model_type", None)
    if model_type is None:
        raise ConversionError(f"{where}: no model_type, so the architecture is unknown")
    for key in ("transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"):
        tree.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **tree)
    except (ValueError, KeyError, TypeError) as error:
        raise ConversionError(f"{where}: unsupported architecture {model_type!r} ({error})") from error


def architecture_config(tree: dict, where: str, model_type: str, architecture: str) -> Any:
    """`hf_config` of a config.json that must be of `model_type` (that of `architecture`), else
    ConversionError naming both."""
    if tree.get("model_type") != model_type:
        raise ConversionError(f"{where}: model_type {tree.get('model_type')!r} is not {model_type!r} "
                              f"({architecture})")
    return hf_config(tree, where)


def check_token_id(field: str, token: int, vocab_size: int, where: str) -> None:
    """ConversionError unless the special token `field` = `token` is a row of the text vocabulary."""
    if not 0 <= token < vocab_size:
        raise ConversionError(f"{where}: {field} {token} is outside the text vocabulary of {vocab_size} tokens "
                              f"(mismatched vocab)")


def feature_problems(cfg: Any, where: str, projector: str) -> list[str]:
    """What megamm cannot read of a LLaVA-style config's image features (llava-hf, InternVL): several
    feature layers, a projector activation other than exact GELU (`projector` names megamm's),
    an unknown feature strategy."""
    problems = []
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        problems.append(f"{where}: vision_feature_layer {layer!r}: megamm feeds the projector one hidden state, "
                        f"not a concatenation of several layers")
    if cfg.projector_hidden_act != "gelu":
        problems.append(f"{where}: projector_hidden_act {cfg.projector_hidden_act!r}: {projector} uses "
                        f"exact (erf) GELU only")
    strategy = cfg.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        problems.append(f"{where}: unknown vision_feature_select_strategy {strategy!r}")
    return problems


def raise_problems(problems: list[str], heading: str | None = None) -> None:
    """Raise one ConversionError naming every problem (nothing when the list is empty)."""
    if not problems:
        return
    if heading is None:
        raise ConversionError("; ".join(problems))
    raise ConversionError(heading + ":\n  - " + "\n  - ".join(problems))
