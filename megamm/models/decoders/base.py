"""The LLaMA-style decoder form that the LLaMA, Mistral and Qwen2 families share.

Hugging Face tensor names (canonical, "text." + the key without the causal LM's "model."):

    embed_tokens.weight, norm.weight, lm_head.weight (absent when tied)
    layers.{i}.self_attn.{q,k,v,o}_proj.{weight[,bias]}, layers.{i}.mlp.{gate,up,down}_proj.{weight[,bias]}
    layers.{i}.input_layernorm.weight, layers.{i}.post_attention_layernorm.weight

A family subclass decides the biases (`biases_from_hf`, `bias_problems`, `bias_fields`) and any
field of its own (Mistral's sliding window); everything else is mapped here, and every field that
changes the computation is mapped or refused.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from megamm.config import LanguageConfig, TransformerConfig
from megamm.models.keymap import Entry

# Rotary tables some old checkpoints stored: derived from the config, never converted.
DERIVED = re.compile(r"^text\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def rope_theta(cfg: Any, where: str, problems: list[str]) -> float:
    """The rope base of a transformers config, read in both spellings (`rope_theta` before
    transformers 5, `rope_parameters` after); a scaled rope is a problem."""
    params = getattr(cfg, "rope_parameters", None)
    scaling = getattr(cfg, "rope_scaling", None)
    if isinstance(params, dict):
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    else:
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        theta = getattr(cfg, "rope_theta", 10000.0)
    if rope_type != "default":
        problems.append(f"{where}: rope scaling {rope_type!r} is not implemented by megamm's rotary embedding")
    return float(theta)


class DecoderFamily(ABC):
    """One family; subclasses set the class attributes and the bias rules."""

    name: str
    hf_model_type: str
    hf_architecture: str

    # ---- biases: the one place the families differ in architecture ---------------------------------

    @abstractmethod
    def biases_from_hf(self, cfg: Any, where: str, problems: list[str]) -> tuple[bool, bool]:
        """(add_bias_linear, add_qkv_bias) for a transformers config of this family."""

    @abstractmethod
    def bias_problems(self, t: TransformerConfig) -> list[str]:
        """Bias settings this family's Hugging Face form cannot hold."""

    @abstractmethod
    def bias_fields(self, t: TransformerConfig) -> dict:
        """The Hugging Face config fields that state the biases."""

    # ---- config ---------------------------------------------------------------------------------

    def problems(self, language: LanguageConfig) -> list[str]:
        """Where `language` has no Hugging Face form of this family (empty: it converts)."""
        t = language.transformer
        found = []
        if t.normalization != "rmsnorm" or t.activation != "swiglu" or t.position_embedding != "rope":
            found.append(f"language.transformer: {self.name} needs rmsnorm, swiglu and rope")
        return found + self.bias_problems(t)

    def hf_refusals(self, cfg: Any, where: str, problems: list[str]) -> None:
        """Family fields that change the computation and megamm does not implement (none here)."""

    def config_from_hf(self, cfg: Any, where: str, problems: list[str]) -> LanguageConfig:
        """A transformers config object -> LanguageConfig (image_token_id still to be set). What
        cannot be mapped goes to `problems`; the result is only meaningful when none was added."""
        if cfg.hidden_act != "silu":
            problems.append(f"{where}: hidden_act {cfg.hidden_act!r}: megamm's decoder MLP is SwiGLU (silu) only")
        bias_linear, qkv_bias = self.biases_from_hf(cfg, where, problems)
        self.hf_refusals(cfg, where, problems)
        theta = rope_theta(cfg, where, problems)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        transformer = TransformerConfig(
            hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_attention_heads=heads,
            num_query_groups=getattr(cfg, "num_key_value_heads", None) or heads,
            kv_channels=None if head_dim * heads == cfg.hidden_size else head_dim,
            ffn_hidden_size=cfg.intermediate_size, normalization="rmsnorm", norm_epsilon=float(cfg.rms_norm_eps),
            activation="swiglu", add_bias_linear=bias_linear, add_qkv_bias=qkv_bias, position_embedding="rope",
            rotary_base=theta, max_position_embeddings=cfg.max_position_embeddings, causal=True,
            attention_dropout=float(getattr(cfg, "attention_dropout", 0.0)),
        )
        return LanguageConfig(transformer=transformer, family=self.name, vocab_size=cfg.vocab_size,
                              make_vocab_size_divisible_by=128,
                              tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)), image_token_id=0)

    def kept_fields(self, cfg: Any) -> dict:
        """Hugging Face fields megamm does not use but an export gives back (HfExtras names)."""
        return {}

    def config_to_hf(self, language: LanguageConfig, kept: Mapping[str, Any]) -> dict:
        """LanguageConfig -> the Hugging Face text config tree; `kept`: the fields an import kept
        (token ids, `kept_fields`). Call `problems` first."""
        t = language.transformer
        return {
            "model_type": self.hf_model_type, "architectures": [self.hf_architecture],
            "vocab_size": language.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.ffn_hidden_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.query_groups, "head_dim": t.head_dim, "hidden_act": "silu",
            "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.norm_epsilon,
            # Both spellings: transformers < 5 reads rope_theta, >= 5 rope_parameters.
            "rope_theta": t.rotary_base, "rope_parameters": {"rope_type": "default", "rope_theta": t.rotary_base},
            "tie_word_embeddings": language.tie_word_embeddings, "attention_dropout": t.attention_dropout,
            "pad_token_id": kept.get("pad_token_id"), "bos_token_id": kept.get("bos_token_id"),
            "eos_token_id": kept.get("eos_token_id"), **self.bias_fields(t),
        }

    # ---- keys -----------------------------------------------------------------------------------

    def entries(self, language: LanguageConfig) -> list[Entry]:
        """The key map: every LanguageModel parameter (all stages) and its canonical tensors."""
        t = language.transformer
        q_rows, kv_rows = t.num_attention_heads * t.head_dim, t.query_groups * t.head_dim
        qkv_kinds = ("weight", "bias") if t.add_bias_linear or t.add_qkv_bias else ("weight",)
        kinds = ("weight", "bias") if t.add_bias_linear else ("weight",)
        out = [Entry("language.embedding.weight", ("text.embed_tokens.weight",))]
        for i in range(t.num_layers):
            src, dst = f"text.layers.{i}.", f"language.decoder.layers.{i}."
            out += [Entry(dst + f"self_attention.qkv.{kind}",
                          tuple(src + f"self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")),
                          (q_rows, kv_rows, kv_rows)) for kind in qkv_kinds]
            for kind in kinds:
                out += [
                    Entry(dst + f"self_attention.proj.{kind}", (src + f"self_attn.o_proj.{kind}",)),
                    Entry(dst + f"mlp.fc1.{kind}", (src + f"mlp.gate_proj.{kind}", src + f"mlp.up_proj.{kind}")),
                    Entry(dst + f"mlp.fc2.{kind}", (src + f"mlp.down_proj.{kind}",)),
                ]
            out += [Entry(dst + "input_norm.weight", (src + "input_layernorm.weight",)),
                    Entry(dst + "pre_mlp_norm.weight", (src + "post_attention_layernorm.weight",))]
        out.append(Entry("language.final_norm.weight", ("text.norm.weight",)))
        if not language.tie_word_embeddings:
            out.append(Entry("language.output_layer.weight", ("text.lm_head.weight",)))
        return out

    def derived(self, name: str) -> bool:
        """A canonical tensor some checkpoints store that megamm derives instead (not converted)."""
        return bool(DERIVED.match(name))
