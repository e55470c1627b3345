"""Key maps: every spelling of a source tensor -> one canonical name, and megamm parameters <->
canonical tensors.

Canonical names drop the nesting that differs between layouts and transformers versions:

    vision.<CLIP/SigLIP vision key without "vision_model.">   vision.encoder.layers.0.self_attn.q_proj.weight
    projector.linear_1.weight, projector.linear_2.bias         the LLaVA projector
    text.<LLaMA key without "model.">, text.lm_head.weight     text.layers.3.mlp.gate_proj.weight

Spellings read (`canonical_name`):
  llava-hf, transformers < 4.52   language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*,
                                  multi_modal_projector.*
  llava-hf, transformers >= 4.52  model.language_model.*, lm_head.*, model.vision_tower.[vision_model.]*,
                                  model.multi_modal_projector.*  (transformers 5 dropped "vision_model.")
  original LLaVA                  model.*, lm_head.*, model.mm_projector.{0,2}.* (mlp2x_gelu) or
                                  model.mm_projector.* (linear), model.vision_tower.vision_tower.vision_model.*
  CLIP / SigLIP directory         [vision_model.]*  (text_model.*, projections, logit scale: not LLaVA)
  LLaMA / Mistral directory       model.*, lm_head.*

A megamm parameter is one canonical tensor, or several concatenated along dim 0 (`[q; k; v]`,
`[gate; up]`), matching the master layouts of megamm.parallel.sharding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megamm.config import LlavaConfig

# Canonical tensors that exist in Hugging Face models but are not on LLaVA's path: the vision
# tower's final norm and SigLIP's pooling head (LLaVA reads a hidden state before them) and
# rotary tables some old checkpoints stored. They are kept aside (`hf_extra/`) or skipped, and
# named in the summary.
UNUSED_BY_LLAVA = re.compile(r"^(vision\.post_layernorm\.|vision\.head\.|text\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$)")
# Tensors of a full CLIP/SigLIP model that belong to its text tower or contrastive head.
NOT_VISION = re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale$|logit_bias$)")
# What an export gives back when present (the derived rotary table is never written).
KEPT_ASIDE = re.compile(r"^(vision\.post_layernorm\.|vision\.head\.)")

_LLAVA_HF_PREFIXES = (
    ("model.language_model.", "text."),
    ("language_model.model.", "text."),
    ("language_model.lm_head.", "text.lm_head."),
    ("lm_head.", "text.lm_head."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
)
_ORIGINAL_PREFIXES = (
    ("model.mm_projector.0.", "projector.linear_1."),
    ("model.mm_projector.2.", "projector.linear_2."),
    ("model.mm_projector.", "projector.linear_1."),
    ("model.vision_tower.vision_tower.", "vision."),
    ("model.", "text."),
    ("lm_head.", "text.lm_head."),
)
_TEXT_PREFIXES = (("model.", "text."), ("lm_head.", "text.lm_head."))


def _rename(key: str, prefixes: tuple[tuple[str, str], ...]) -> str | None:
    for old, new in prefixes:
        if key.startswith(old):
            name = new + key[len(old):]
            if name.startswith("vision.vision_model."):
                name = "vision." + name[len("vision.vision_model."):]
            return name
    return None


def canonical_name(key: str, source: str) -> str | None:
    """The canonical name of a source key (None: the key is not one this source kind spells).

    source: "llava-hf", "original-llava", "vision" or "text".
    """
    if source == "llava-hf":
        return _rename(key, _LLAVA_HF_PREFIXES)
    if source == "original-llava":
        return _rename(key, _ORIGINAL_PREFIXES)
    if source == "text":
        return _rename(key, _TEXT_PREFIXES)
    if source == "vision":
        if NOT_VISION.match(key):
            return None
        return "vision." + key.removeprefix("vision_model.")
    raise ValueError(f"unknown source kind {source!r}")


def legacy_hf_key(name: str) -> str:
    """Canonical name -> the llava-hf key spelling every transformers version loads."""
    if name == "text.lm_head.weight":
        return "language_model.lm_head.weight"
    for prefix, new in (("text.", "language_model.model."), ("vision.", "vision_tower.vision_model."),
                        ("projector.", "multi_modal_projector.")):
        if name.startswith(prefix):
            return new + name[len(prefix):]
    raise ValueError(f"not a canonical name: {name}")


@dataclass(frozen=True)
class Entry:
    """One megamm parameter and the canonical tensors it is made of (concatenated along dim 0)."""

    megamm: str
    parts: tuple[str, ...]


def _vision_entries(config: LlavaConfig) -> list[Entry]:
    v = config.vision
    out = [Entry("vision.patch_embedding", ("vision.embeddings.patch_embedding.weight",)),
           Entry("vision.position_embedding", ("vision.embeddings.position_embedding.weight",))]
    if v.patch_bias:
        out.append(Entry("vision.patch_bias", ("vision.embeddings.patch_embedding.bias",)))
    if v.class_token:
        out.append(Entry("vision.class_embedding", ("vision.embeddings.class_embedding",)))
    if v.pre_norm:
        out += [Entry(f"vision.pre_norm.{k}", (f"vision.pre_layrnorm.{k}",)) for k in ("weight", "bias")]
    for i in range(v.transformer.num_layers):
        src, dst = f"vision.encoder.layers.{i}.", f"vision.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out += [
                Entry(dst + f"self_attention.qkv.{kind}",
                      tuple(src + f"self_attn.{p}_proj.{kind}" for p in ("q", "k", "v"))),
                Entry(dst + f"self_attention.proj.{kind}", (src + f"self_attn.out_proj.{kind}",)),
                Entry(dst + f"mlp.fc1.{kind}", (src + f"mlp.fc1.{kind}",)),
                Entry(dst + f"mlp.fc2.{kind}", (src + f"mlp.fc2.{kind}",)),
                Entry(dst + f"input_norm.{kind}", (src + f"layer_norm1.{kind}",)),
                Entry(dst + f"pre_mlp_norm.{kind}", (src + f"layer_norm2.{kind}",)),
            ]
    return out


def projector_entries(config: LlavaConfig) -> list[Entry]:
    kinds = ("weight", "bias") if config.projector.add_bias else ("weight",)
    out = [Entry(f"projector.fc1.{k}", (f"projector.linear_1.{k}",)) for k in kinds]
    if config.projector.type == "mlp2x_gelu":
        out += [Entry(f"projector.fc2.{k}", (f"projector.linear_2.{k}",)) for k in kinds]
    return out


def _language_entries(config: LlavaConfig) -> list[Entry]:
    lang = config.language
    kinds = ("weight", "bias") if lang.transformer.add_bias_linear else ("weight",)
    out = [Entry("language.embedding.weight", ("text.embed_tokens.weight",))]
    for i in range(lang.transformer.num_layers):
        src, dst = f"text.layers.{i}.", f"language.decoder.layers.{i}."
        for kind in kinds:
            out += [
                Entry(dst + f"self_attention.qkv.{kind}",
                      tuple(src + f"self_attn.{p}_proj.{kind}" for p in ("q", "k", "v"))),
                Entry(dst + f"self_attention.proj.{kind}", (src + f"self_attn.o_proj.{kind}",)),
                Entry(dst + f"mlp.fc1.{kind}", (src + f"mlp.gate_proj.{kind}", src + f"mlp.up_proj.{kind}")),
                Entry(dst + f"mlp.fc2.{kind}", (src + f"mlp.down_proj.{kind}",)),
            ]
        out += [Entry(dst + "input_norm.weight", (src + "input_layernorm.weight",)),
                Entry(dst + "pre_mlp_norm.weight", (src + "post_attention_layernorm.weight",))]
    out.append(Entry("language.final_norm.weight", ("text.norm.weight",)))
    if not lang.tie_word_embeddings:
        out.append(Entry("language.output_layer.weight", ("text.lm_head.weight",)))
    return out


def model_entries(config: LlavaConfig, with_projector: bool = True) -> list[Entry]:
    """Every megamm parameter of a whole (all stages) LlavaModel, in a fixed order."""
    return _vision_entries(config) + (projector_entries(config) if with_projector else []) + _language_entries(config)
