"""InternViT towers (InternVL's vision encoder, transformers' InternVLVisionModel): class token, no
pre-norm, a patch bias, layer scale and optional QK normalization (VisionConfig.intern_vit; the
layer is megamm.models.internvit's).

Hugging Face tensor names (canonical: "vision." + the key inside the vision model):

    embeddings.cls_token [1, 1, h]   embeddings.position_embeddings [1, patches + 1, h]
    embeddings.patch_embeddings.projection.{weight,bias}   embeddings.mask_token (unused: kept aside)
    encoder.layer.{i}.attention.{q,k,v}_proj.{weight[,bias]}   .attention.projection_layer.*
    encoder.layer.{i}.attention.{q,k}_norm.weight (use_qk_norm)   .mlp.fc{1,2}.*
    encoder.layer.{i}.layernorm_{before,after}.weight [.bias]     .lambda_{1,2}

megamm keeps the class token and the position table in these shapes (VisionTower broadcasts them),
so the tensors convert unchanged. Refused: no absolute positions, mean pooling off (a final
LayerNorm on the last hidden state), dropout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megamm.config import InternViTConfig, TransformerConfig, VisionConfig
from megamm.models.keymap import Entry
from megamm.models.towers.base import ACTIVATIONS_FROM_HF, ACTIVATIONS_TO_HF, VisionTowerFamily

NORMS_FROM_HF = {"layer_norm": "layernorm", "rms_norm": "rmsnorm"}
NORMS_TO_HF = {v: k for k, v in NORMS_FROM_HF.items()}
MASK_TOKEN = "vision.embeddings.mask_token"
# InternVLVisionRMSNorm's default, which its q_norm / k_norm use (layer_norm_eps is the layers' norms').
HF_QK_NORM_EPSILON = 1e-6


def _square(value: Any, name: str, where: str, problems: list[str]) -> int:
    """An int, or a (height, width) pair that must be square."""
    if isinstance(value, int):
        return value
    height, width = value
    if height != width:
        problems.append(f"{where}: {name} {list(value)}: megamm's ViT takes square images")
    return int(height)


@dataclass(frozen=True)
class InternViTFamily(VisionTowerFamily):
    def config_from_hf(self, cfg: Any, select_layer: int, keep_class_token: bool, where: str,
                       problems: list[str]) -> VisionConfig:
        """An InternVLVisionConfig -> VisionConfig; what cannot be mapped goes to `problems`."""
        activation = ACTIVATIONS_FROM_HF.get(cfg.hidden_act)
        if activation is None:
            problems.append(f"{where}: hidden_act {cfg.hidden_act!r} has no megamm equivalent "
                            f"({', '.join(sorted(ACTIVATIONS_FROM_HF))})")
        normalization = NORMS_FROM_HF.get(cfg.norm_type)
        if normalization is None:
            problems.append(f"{where}: norm_type {cfg.norm_type!r}; expected one of {', '.join(NORMS_FROM_HF)}")
        if not cfg.use_absolute_position_embeddings:
            problems.append(f"{where}: use_absolute_position_embeddings false: megamm's ViT learns a position table")
        if not cfg.use_mean_pooling:
            problems.append(f"{where}: use_mean_pooling false puts a LayerNorm on the last hidden state, which "
                            f"megamm's InternViT does not have")
        for field in ("hidden_dropout_prob", "projection_dropout"):
            if float(getattr(cfg, field)):
                problems.append(f"{where}: {field} {getattr(cfg, field)}: megamm's InternViT has no such dropout")
        if keep_class_token:
            problems.append(f"{where}: vision_feature_select_strategy 'full' keeps the class token, which leaves "
                            f"no square patch grid for InternVL's pixel shuffle")
        image_size = _square(cfg.image_size, "image_size", where, problems)
        patch_size = _square(cfg.patch_size, "patch_size", where, problems)
        transformer = TransformerConfig(
            hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            ffn_hidden_size=cfg.intermediate_size, normalization=normalization or "layernorm",
            norm_epsilon=float(cfg.layer_norm_eps), activation=activation or "gelu", add_bias_linear=True,
            position_embedding="learned", max_position_embeddings=(image_size // patch_size) ** 2 + 1, causal=False,
            attention_dropout=float(cfg.attention_dropout), init_method_std=float(cfg.initializer_range),
        )
        intern = InternViTConfig(qk_norm=bool(cfg.use_qk_norm), qk_norm_epsilon=HF_QK_NORM_EPSILON,
                                 qkv_bias=bool(cfg.attention_bias), layer_scale_init=float(cfg.layer_scale_init_value))
        return self.config(transformer, image_size=image_size, patch_size=patch_size, num_channels=cfg.num_channels,
                           select_layer=select_layer, drop_class_token=True, intern_vit=intern)

    def problems(self, vision: VisionConfig) -> list[str]:
        found = []
        flags = (vision.class_token, vision.pre_norm, vision.patch_bias)
        want = (self.class_token, self.pre_norm, self.patch_bias)
        if flags != want:
            found.append(f"vision (class_token, pre_norm, patch_bias) = {flags}: the {self.name} family's Hugging "
                         f"Face tower has {want}")
        t, intern = vision.transformer, vision.intern_vit
        if intern is None:
            found.append(f"vision.intern_vit: a {self.name} tower needs it (layer scale, QK norm settings)")
        elif intern.qk_norm and intern.qk_norm_epsilon != HF_QK_NORM_EPSILON:
            found.append(f"vision.intern_vit.qk_norm_epsilon {intern.qk_norm_epsilon}: transformers' InternViT "
                         f"QK norm uses {HF_QK_NORM_EPSILON}")
        if t.activation not in ACTIVATIONS_TO_HF:
            found.append(f"vision.transformer.activation {t.activation!r}: an {self.name} tower has one of "
                         f"{', '.join(ACTIVATIONS_TO_HF)}")
        if not vision.drop_class_token:
            found.append("vision.drop_class_token: InternVL drops the class token before its pixel shuffle")
        return found

    def config_to_hf(self, vision: VisionConfig, kept_aside: list[str]) -> dict:
        t, intern = vision.transformer, vision.intern_vit
        return {
            "model_type": self.hf_model_type, "hidden_size": t.hidden_size, "intermediate_size": t.ffn_hidden_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_attention_heads,
            "num_channels": vision.num_channels, "image_size": [vision.image_size] * 2,
            "patch_size": [vision.patch_size] * 2, "hidden_act": ACTIVATIONS_TO_HF[t.activation],
            "norm_type": NORMS_TO_HF[t.normalization], "layer_norm_eps": t.norm_epsilon,
            "attention_dropout": t.attention_dropout, "attention_bias": intern.qkv_bias, "use_qk_norm": intern.qk_norm,
            "layer_scale_init_value": intern.layer_scale_init, "initializer_range": t.init_method_std,
            "use_mask_token": MASK_TOKEN in kept_aside, "use_absolute_position_embeddings": True,
            "use_mean_pooling": True, "hidden_dropout_prob": 0.0, "projection_dropout": 0.0,
        }

    def entries(self, vision: VisionConfig) -> list[Entry]:
        """The key map: every VisionTower parameter (with InternViT layers) and its canonical tensors."""
        out = [Entry("vision.patch_embedding", ("vision.embeddings.patch_embeddings.projection.weight",)),
               Entry("vision.patch_bias", ("vision.embeddings.patch_embeddings.projection.bias",)),
               Entry("vision.class_embedding", ("vision.embeddings.cls_token",)),
               Entry("vision.position_embedding", ("vision.embeddings.position_embeddings",))]
        t, intern = vision.transformer, vision.intern_vit
        norm_kinds = ("weight", "bias") if t.normalization == "layernorm" else ("weight",)
        for i in range(t.num_layers):
            src, dst = f"vision.encoder.layer.{i}.", f"vision.encoder.layers.{i}."
            qkv_kinds = ("weight", "bias") if intern.qkv_bias else ("weight",)
            out += [Entry(dst + f"self_attention.qkv.{k}", tuple(src + f"attention.{p}_proj.{k}" for p in "qkv"))
                    for k in qkv_kinds]
            if intern.qk_norm:
                out += [Entry(dst + f"self_attention.{p}_norm.weight", (src + f"attention.{p}_norm.weight",))
                        for p in "qk"]
            for kind in ("weight", "bias"):
                out += [Entry(dst + f"self_attention.proj.{kind}", (src + f"attention.projection_layer.{kind}",)),
                        Entry(dst + f"mlp.fc1.{kind}", (src + f"mlp.fc1.{kind}",)),
                        Entry(dst + f"mlp.fc2.{kind}", (src + f"mlp.fc2.{kind}",))]
            out += [Entry(dst + f"input_norm.{k}", (src + f"layernorm_before.{k}",)) for k in norm_kinds]
            out += [Entry(dst + f"pre_mlp_norm.{k}", (src + f"layernorm_after.{k}",)) for k in norm_kinds]
            out += [Entry(dst + f"layer_scale.{name}", (src + name,)) for name in ("lambda_1", "lambda_2")]
        return out

    def kept_aside(self, name: str) -> bool:
        """The mask token (masked-image pretraining only) is kept for export."""
        return name == MASK_TOKEN

    def export_fill(self, vision: VisionConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Nothing to fill: without a kept mask token the export says use_mask_token false."""
        return {}


INTERNVIT = InternViTFamily(
    name="internvit",
    class_token=True,
    pre_norm=False,
    patch_bias=True,
    # InternVL's image processor normalizes with the ImageNet statistics.
    image_mean=(0.485, 0.456, 0.406),
    image_std=(0.229, 0.224, 0.225),
    hf_model_type="internvl_vision",
    hf_full_model_type="internvl",
    float_tile_ratios=True,
)
