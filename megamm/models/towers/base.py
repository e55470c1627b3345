"""The Hugging Face ViT form shared by CLIP and SigLIP towers, and what a family adds to it.

Hugging Face tensor names (canonical, "vision." + the key inside the vision model):

    embeddings.patch_embedding.weight [.bias]   embeddings.class_embedding   embeddings.position_embedding.weight
    pre_layrnorm.{weight,bias}                   (CLIP's spelling of the pre-norm)
    encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}, .mlp.fc{1,2}.*, .layer_norm{1,2}.*
    post_layernorm.*, head.*                     after the layer LLaVA reads: kept aside for export

A family's architecture flags must agree with its Hugging Face form when the model is converted;
megamm itself builds any combination (a research tower may differ from every family).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from megamm.config import TransformerConfig, VisionConfig
from megamm.models.keymap import Entry

RGB = tuple[float, float, float]
ACTIVATIONS_FROM_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                       "gelu_new": "gelu_tanh"}
ACTIVATIONS_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# Canonical tensors of the Hugging Face tower after the hidden state LLaVA reads.
KEPT_ASIDE = ("vision.post_layernorm.", "vision.head.")
POST_NORM = ("vision.post_layernorm.weight", "vision.post_layernorm.bias")


@dataclass(frozen=True)
class VisionTowerFamily:
    """One family. `hf_model_type` is the vision model's type (clip_vision_model); a directory of the
    full model (`hf_full_model_type`, clip) is read through its vision_config."""

    name: str
    class_token: bool
    pre_norm: bool
    patch_bias: bool
    image_mean: RGB
    image_std: RGB
    hf_model_type: str
    hf_full_model_type: str
    # Fields of the Hugging Face vision config an export writes besides the shared ones.
    hf_export_fields: Mapping[str, Any] = field(default_factory=dict)
    # Tiles are chosen by float aspect ratios, as the family's Hugging Face processor does
    # (megamm.data.images.choose_grid); False: exact ratios.
    float_tile_ratios: bool = False

    def config(self, transformer: TransformerConfig, **fields: Any) -> VisionConfig:
        """A VisionConfig of this family: its architecture flags, the rest from `fields`."""
        return VisionConfig(transformer, family=self.name, class_token=self.class_token, pre_norm=self.pre_norm,
                            patch_bias=self.patch_bias, **fields)

    def problems(self, vision: VisionConfig) -> list[str]:
        """Where `vision` has no Hugging Face form of this family (empty: it converts)."""
        t = vision.transformer
        found = []
        flags = (vision.class_token, vision.pre_norm, vision.patch_bias)
        want = (self.class_token, self.pre_norm, self.patch_bias)
        if flags != want:
            found.append(f"vision (class_token, pre_norm, patch_bias) = {flags}: the {self.name} family's Hugging "
                         f"Face tower has {want}")
        if t.normalization != "layernorm" or not t.add_bias_linear or t.activation not in ACTIVATIONS_TO_HF:
            found.append(f"vision.transformer: a {self.name} tower has LayerNorm, biased linears and one of the "
                         f"activations {', '.join(ACTIVATIONS_TO_HF)}")
        if t.query_groups != t.num_attention_heads or t.head_dim * t.num_attention_heads != t.hidden_size:
            found.append(f"vision.transformer: GQA or a custom head dimension has no {self.name} equivalent")
        return found

    def config_from_hf(self, cfg: Any, select_layer: int, keep_class_token: bool, where: str,
                       problems: list[str]) -> VisionConfig:
        """A transformers vision config object -> VisionConfig; what cannot be mapped goes to `problems`."""
        activation = ACTIVATIONS_FROM_HF.get(cfg.hidden_act)
        if activation is None:
            problems.append(f"{where}: hidden_act {cfg.hidden_act!r} has no megamm equivalent "
                            f"({', '.join(sorted(ACTIVATIONS_FROM_HF))})")
        if not self.class_token and not keep_class_token:
            problems.append(f"{where}: vision_feature_select_strategy 'default' drops the first token, but a "
                            f"{self.name} tower has no class token (it would drop a patch); use 'full'")
        transformer = TransformerConfig(
            hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            ffn_hidden_size=cfg.intermediate_size, normalization="layernorm", norm_epsilon=float(cfg.layer_norm_eps),
            activation=activation or "gelu", add_bias_linear=True, position_embedding="learned",
            max_position_embeddings=(cfg.image_size // cfg.patch_size) ** 2 + int(self.class_token), causal=False,
            attention_dropout=float(getattr(cfg, "attention_dropout", 0.0)),
        )
        return self.config(transformer, image_size=cfg.image_size, patch_size=cfg.patch_size,
                           num_channels=cfg.num_channels, select_layer=select_layer,
                           drop_class_token=not keep_class_token)

    def config_to_hf(self, vision: VisionConfig, kept_aside: list[str]) -> dict:
        """VisionConfig -> the Hugging Face vision config tree (`kept_aside`: canonical names of the
        tensors an import kept, which some fields describe)."""
        t = vision.transformer
        return {
            "model_type": self.hf_model_type, "hidden_size": t.hidden_size, "intermediate_size": t.ffn_hidden_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_attention_heads,
            "num_channels": vision.num_channels, "image_size": vision.image_size, "patch_size": vision.patch_size,
            "hidden_act": ACTIVATIONS_TO_HF[t.activation], "layer_norm_eps": t.norm_epsilon,
            "attention_dropout": t.attention_dropout, **self.hf_export_fields,
        }

    def entries(self, vision: VisionConfig) -> list[Entry]:
        """The key map: every VisionTower parameter and its canonical tensors."""
        out = [Entry("vision.patch_embedding", ("vision.embeddings.patch_embedding.weight",)),
               Entry("vision.position_embedding", ("vision.embeddings.position_embedding.weight",))]
        if vision.patch_bias:
            out.append(Entry("vision.patch_bias", ("vision.embeddings.patch_embedding.bias",)))
        if vision.class_token:
            out.append(Entry("vision.class_embedding", ("vision.embeddings.class_embedding",)))
        if vision.pre_norm:
            out += [Entry(f"vision.pre_norm.{k}", (f"vision.pre_layrnorm.{k}",)) for k in ("weight", "bias")]
        for i in range(vision.transformer.num_layers):
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

    def kept_aside(self, name: str) -> bool:
        """A canonical tensor of the Hugging Face tower that LLaVA never reads (kept for export)."""
        return name.startswith(KEPT_ASIDE)

    def export_fill(self, vision: VisionConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Tensors the Hugging Face tower needs that megamm has no value for, when no import kept
        them: the final LayerNorm, written as the identity (weight 1, bias 0)."""
        hidden = vision.transformer.hidden_size
        return {POST_NORM[0]: torch.ones(hidden, dtype=dtype), POST_NORM[1]: torch.zeros(hidden, dtype=dtype)}
