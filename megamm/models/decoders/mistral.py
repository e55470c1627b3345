"""Mistral: LLaMA's decoder without biases, plus a sliding attention window, which megamm does not
implement: refused when it is shorter than the longest sequence (where it would change the
attention), otherwise kept and given back on export."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megamm.config import LanguageConfig, TransformerConfig
from megamm.models.decoders.base import DecoderFamily


class MistralFamily(DecoderFamily):
    name = "mistral"
    hf_model_type = "mistral"
    hf_architecture = "MistralForCausalLM"

    def biases_from_hf(self, cfg: Any, where: str, problems: list[str]) -> tuple[bool, bool]:
        return False, False

    def bias_problems(self, t: TransformerConfig) -> list[str]:
        if t.add_bias_linear or t.add_qkv_bias:
            return ["language.transformer: Mistral has no linear biases (add_bias_linear, add_qkv_bias)"]
        return []

    def bias_fields(self, t: TransformerConfig) -> dict:
        return {}

    def hf_refusals(self, cfg: Any, where: str, problems: list[str]) -> None:
        sliding = getattr(cfg, "sliding_window", None)
        if sliding is not None and sliding < cfg.max_position_embeddings:
            problems.append(f"{where}: sliding_window {sliding} < max_position_embeddings "
                            f"{cfg.max_position_embeddings}: megamm has no sliding-window attention")

    def kept_fields(self, cfg: Any) -> dict:
        return {"sliding_window": getattr(cfg, "sliding_window", None)}

    def config_to_hf(self, language: LanguageConfig, kept: Mapping[str, Any]) -> dict:
        return {**super().config_to_hf(language, kept), "sliding_window": kept.get("sliding_window")}


MISTRAL = MistralFamily()
