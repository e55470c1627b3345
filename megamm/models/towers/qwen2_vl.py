"""The Qwen2-VL family's vision towers (Qwen2-VL, Qwen2.5-VL): native resolution, 2D rotary, a 2x2
patch merger; the module is megamm.models.native_vision.NativeResolutionTower.

Hugging Face tensor names (canonical: "vision." + the key inside Qwen2VLForConditionalGeneration's
`visual` module, spelled `visual.*` or, in transformers 5, `model.visual.*`; HF_PREFIXES):

    patch_embed.proj.weight                         [h, C, T, P, P] (Conv3d, no bias)
    blocks.{i}.norm{1,2}.weight [.bias]             LayerNorm (Qwen2-VL) / RMSNorm (Qwen2.5-VL)
    blocks.{i}.attn.qkv.{weight,bias}               one fused [q; k; v] linear
    blocks.{i}.attn.proj.{weight,bias}
    blocks.{i}.mlp.fc{1,2}.*                        Qwen2-VL (quick_gelu)
    blocks.{i}.mlp.{gate,up,down}_proj.*            Qwen2.5-VL (SwiGLU, with biases)
    merger.ln_q.weight [.bias], merger.mlp.{0,2}.*  the patch merger

Qwen2-VL has no windows; Qwen2.5-VL attends within windows in every layer but
`fullatt_block_indexes`. Both norms (layers and merger) use eps 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megamm.config.model import NativeResolutionConfig, TransformerConfig, VisionConfig
from megamm.models.keymap import Entry
from megamm.models.towers.base import RGB

HF_PREFIXES = ("model.visual.", "visual.")
HF_NORM_EPSILON = 1e-6
# The image processor's statistics (OpenAI CLIP's).
QWEN_MEAN: RGB = (0.48145466, 0.4578275, 0.40821073)
QWEN_STD: RGB = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class NativeTowerFamily:
    """One native-resolution family; `windowed` (Qwen2.5-VL) selects its block form: RMSNorm,
    SwiGLU and window attention, against Qwen2-VL's LayerNorm and quick_gelu MLP."""

    name: str
    windowed: bool
    image_mean: RGB
    image_std: RGB
    hf_model_type: str
    hf_full_model_type: str
    # Native resolution: images are never tiled.
    float_tile_ratios = False

    @property
    def normalization(self) -> str:
        return "rmsnorm" if self.windowed else "layernorm"

    @property
    def activation(self) -> str:
        return "swiglu" if self.windowed else "quick_gelu"

    def config_from_hf(self, cfg: Any) -> VisionConfig:
        """A transformers vision config of this family (Qwen2VLVisionConfig / Qwen2_5_VLVisionConfig),
        or the full model's config whose `vision_config` it reads -> VisionConfig."""
        if getattr(cfg, "model_type", None) == self.hf_full_model_type:
            cfg = cfg.vision_config
        if getattr(cfg, "model_type", None) != self.hf_model_type:
            raise ValueError(f"a {self.name} tower reads a {self.hf_model_type!r} (or {self.hf_full_model_type!r}) "
                             f"config, got model_type {getattr(cfg, 'model_type', None)!r}")
        if self.windowed:
            hidden, ffn, out = cfg.hidden_size, cfg.intermediate_size, cfg.out_hidden_size
        else:  # Qwen2-VL names the tower width embed_dim and the merger's output hidden_size.
            hidden, ffn, out = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg.hidden_size
        rope = getattr(cfg, "rope_parameters", None) or {}
        transformer = TransformerConfig(
            hidden_size=hidden, num_layers=cfg.depth, num_attention_heads=cfg.num_heads, ffn_hidden_size=ffn,
            normalization=self.normalization, norm_epsilon=HF_NORM_EPSILON, activation=self.activation,
            add_bias_linear=True, position_embedding="rope", rotary_base=float(rope.get("rope_theta", 10000.0)),
            causal=False, init_method_std=float(cfg.initializer_range),
        )
        native = NativeResolutionConfig(
            out_hidden_size=out, temporal_patch_size=cfg.temporal_patch_size,
            spatial_merge_size=cfg.spatial_merge_size,
            window_size=cfg.window_size if self.windowed else None,
            fullatt_block_indexes=tuple(cfg.fullatt_block_indexes) if self.windowed else (),
            merger_norm_epsilon=HF_NORM_EPSILON,
            tokens_per_second=int(cfg.tokens_per_second) if self.windowed else None,
        )
        return VisionConfig(transformer, family=self.name, patch_size=cfg.patch_size, num_channels=cfg.in_channels,
                            native_resolution=native)

    def config_to_hf(self, vision: VisionConfig) -> dict:
        """VisionConfig -> the Hugging Face vision config tree of this family (call `problems` first)."""
        t, native = vision.transformer, vision.native_resolution
        common = {
            "model_type": self.hf_model_type, "depth": t.num_layers, "num_heads": t.num_attention_heads,
            "in_channels": vision.num_channels, "patch_size": vision.patch_size,
            "spatial_merge_size": native.spatial_merge_size, "temporal_patch_size": native.temporal_patch_size,
            "initializer_range": t.init_method_std,
            "rope_parameters": {"rope_type": "axial", "rope_theta": t.rotary_base},
        }
        if not self.windowed:
            return {**common, "embed_dim": t.hidden_size, "hidden_size": native.out_hidden_size,
                    "mlp_ratio": t.ffn_hidden_size // t.hidden_size, "hidden_act": "quick_gelu"}
        return {**common, "hidden_size": t.hidden_size, "intermediate_size": t.ffn_hidden_size,
                "out_hidden_size": native.out_hidden_size, "hidden_act": "silu",
                "tokens_per_second": native.tokens_per_second, "window_size": native.window_size,
                "fullatt_block_indexes": list(native.fullatt_block_indexes)}

    def kept_aside(self, name: str) -> bool:
        """Every tensor of the Hugging Face tower has a megamm parameter: nothing is kept aside."""
        return False

    def export_fill(self, vision: VisionConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Nothing to fill: megamm holds every tensor of the Hugging Face tower."""
        return {}

    def problems(self, vision: VisionConfig) -> list[str]:
        """Where `vision` has no Hugging Face form of this family (empty: it converts)."""
        t, native = vision.transformer, vision.native_resolution
        if native is None:
            return [f"vision.native_resolution: a {self.name} tower needs it"]
        found = []
        form = (t.normalization, t.activation, t.add_bias_linear)
        if form != (self.normalization, self.activation, True):
            found.append(f"vision.transformer (normalization, activation, add_bias_linear) = {form}: the "
                         f"{self.name} tower has ({self.normalization!r}, {self.activation!r}, True)")
        if t.query_groups != t.num_attention_heads or t.head_dim * t.num_attention_heads != t.hidden_size:
            found.append(f"vision.transformer: GQA or a custom head dimension has no {self.name} equivalent")
        if not self.windowed and t.ffn_hidden_size % t.hidden_size:
            found.append(f"vision.transformer.ffn_hidden_size {t.ffn_hidden_size}: the {self.name} tower's MLP "
                         f"width is an integer mlp_ratio x hidden_size {t.hidden_size}")
        if (native.tokens_per_second is not None) != self.windowed:
            found.append(f"vision.native_resolution.tokens_per_second: the {self.name} tower "
                         f"{'scales video positions to seconds (set it)' if self.windowed else 'has none'}")
        if (native.window_size is not None) != self.windowed:
            found.append(f"vision.native_resolution.window_size: the {self.name} tower "
                         f"{'needs windows' if self.windowed else 'has no windows'}")
        return found

    def entries(self, vision: VisionConfig) -> list[Entry]:
        """The key map: every NativeResolutionTower parameter ("vision." + its name) and its canonical tensors."""
        norm_kinds = ("weight", "bias") if self.normalization == "layernorm" else ("weight",)
        out = [Entry("vision.patch_embedding", ("vision.patch_embed.proj.weight",))]
        for i in range(vision.transformer.num_layers):
            src, dst = f"vision.blocks.{i}.", f"vision.encoder.layers.{i}."
            out += [Entry(dst + f"input_norm.{k}", (src + f"norm1.{k}",)) for k in norm_kinds]
            out += [Entry(dst + f"pre_mlp_norm.{k}", (src + f"norm2.{k}",)) for k in norm_kinds]
            for kind in ("weight", "bias"):
                out += [Entry(dst + f"self_attention.qkv.{kind}", (src + f"attn.qkv.{kind}",)),
                        Entry(dst + f"self_attention.proj.{kind}", (src + f"attn.proj.{kind}",))]
                if self.windowed:
                    out += [Entry(dst + f"mlp.fc1.{kind}", (src + f"mlp.gate_proj.{kind}", src + f"mlp.up_proj.{kind}")),
                            Entry(dst + f"mlp.fc2.{kind}", (src + f"mlp.down_proj.{kind}",))]
                else:
                    out += [Entry(dst + f"mlp.fc1.{kind}", (src + f"mlp.fc1.{kind}",)),
                            Entry(dst + f"mlp.fc2.{kind}", (src + f"mlp.fc2.{kind}",))]
        out += [Entry(f"vision.merger.norm.{k}", (f"vision.merger.ln_q.{k}",)) for k in norm_kinds]
        for kind in ("weight", "bias"):
            out += [Entry(f"vision.merger.fc1.{kind}", (f"vision.merger.mlp.0.{kind}",)),
                    Entry(f"vision.merger.fc2.{kind}", (f"vision.merger.mlp.2.{kind}",))]
        return out


def canonical_name(key: str) -> str | None:
    """A Qwen2-VL checkpoint key -> its canonical tensor name, None for keys outside the vision tower."""
    for prefix in HF_PREFIXES:
        if key.startswith(prefix):
            return "vision." + key.removeprefix(prefix)
    return None


QWEN2_VL = NativeTowerFamily(name="qwen2_vl", windowed=False, image_mean=QWEN_MEAN, image_std=QWEN_STD,
                             hf_model_type="qwen2_vl_vision", hf_full_model_type="qwen2_vl")
QWEN2_5_VL = NativeTowerFamily(name="qwen2_5_vl", windowed=True, image_mean=QWEN_MEAN, image_std=QWEN_STD,
                               hf_model_type="qwen2_5_vl_vision", hf_full_model_type="qwen2_5_vl")
