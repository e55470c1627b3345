"""Qwen2 (and Qwen2.5): LLaMA's decoder with biases on q, k and v only (`add_qkv_bias`), GQA, a
large rope base (1e6), tied embeddings in the small models. Its sliding window is off in every
released checkpoint (`use_sliding_window` false); a config that turns it on for any layer is
refused, since megamm has no sliding-window attention."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megamm.config import LanguageConfig, TransformerConfig
from megamm.models.decoders.base import DecoderFamily


class Qwen2Family(DecoderFamily):
    name = "qwen2"
    hf_model_type = "qwen2"
    hf_architecture = "Qwen2ForCausalLM"

    def biases_from_hf(self, cfg: Any, where: str, problems: list[str]) -> tuple[bool, bool]:
        return False, True

    def bias_problems(self, t: TransformerConfig) -> list[str]:
        if t.add_bias_linear or not t.add_qkv_bias:
            return [("language.transformer: Qwen2 has biases on q, k and v only (add_qkv_bias true, "
                    "add_bias_linear false)")]
        return []

    def bias_fields(self, t: TransformerConfig) -> dict:
        return {}

    def hf_refusals(self, cfg: Any, where: str, problems: list[str]) -> None:
        sliding = [i for i, kind in enumerate(getattr(cfg, "layer_types", None) or []) if kind != "full_attention"]
        if getattr(cfg, "use_sliding_window", False) or sliding:
            problems.append(f"{where}: use_sliding_window (sliding attention in layers {sliding}): megamm has no "
                            f"sliding-window attention")

    def config_to_hf(self, language: LanguageConfig, kept: Mapping[str, Any]) -> dict:
        return {**super().config_to_hf(language, kept), "use_sliding_window": False,
                "max_window_layers": language.transformer.num_layers}


QWEN2 = Qwen2Family()
