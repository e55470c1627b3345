"""SigLIP vision towers: no class token, no pre-norm, a bias on the patch convolution, and an
optional attention-pooling head after the last layer (never on LLaVA's path; kept aside on import,
and `vision_use_head` tells the exported config whether it is there)."""

from __future__ import annotations

from dataclasses import dataclass

from megamm.config import VisionConfig
from megamm.models.towers.base import VisionTowerFamily


@dataclass(frozen=True)
class SiglipFamily(VisionTowerFamily):
    def config_to_hf(self, vision: VisionConfig, kept_aside: list[str]) -> dict:
        tree = super().config_to_hf(vision, kept_aside)
        tree["vision_use_head"] = any(name.startswith("vision.head.") for name in kept_aside)
        return tree


SIGLIP = SiglipFamily(
    name="siglip",
    class_token=False,
    pre_norm=False,
    patch_bias=True,
    # SigLIP maps [0, 1] to [-1, 1].
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    hf_model_type="siglip_vision_model",
    hf_full_model_type="siglip",
)
