"""LLaMA (1, 2, 3 without rope scaling; Vicuna): biases on all of q, k, v, o (`attention_bias`) and
the MLP (`mlp_bias`) or on none; megamm has all-or-none (`add_bias_linear`)."""

from __future__ import annotations

from typing import Any

from megamm.config import TransformerConfig
from megamm.models.decoders.base import DecoderFamily


class LlamaFamily(DecoderFamily):
    name = "llama"
    hf_model_type = "llama"
    hf_architecture = "LlamaForCausalLM"

    def biases_from_hf(self, cfg: Any, where: str, problems: list[str]) -> tuple[bool, bool]:
        attention, mlp = bool(getattr(cfg, "attention_bias", False)), bool(getattr(cfg, "mlp_bias", False))
        if attention != mlp:
            problems.append(f"{where}: attention_bias={attention} with mlp_bias={mlp}: megamm has biases on all "
                            f"linear layers or none")
        return attention, False

    def bias_problems(self, t: TransformerConfig) -> list[str]:
        if t.add_qkv_bias and not t.add_bias_linear:
            return [("language.transformer.add_qkv_bias: LLaMA biases q, k, v and o together (attention_bias); "
                    "a q/k/v-only bias is the qwen2 family")]
        return []

    def bias_fields(self, t: TransformerConfig) -> dict:
        return {"attention_bias": t.add_bias_linear, "mlp_bias": t.add_bias_linear}


LLAMA = LlamaFamily()
