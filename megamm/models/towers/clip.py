"""CLIP vision towers (OpenAI CLIP, LLaVA-1.5's ViT-L/14-336): class token, pre-norm, no patch bias."""

from __future__ import annotations

from megamm.models.towers.base import VisionTowerFamily

CLIP = VisionTowerFamily(
    name="clip",
    class_token=True,
    pre_norm=True,
    patch_bias=False,
    # OpenAI CLIP's statistics (also LLaVA's CLIP ViT-L/14-336 tower's).
    image_mean=(0.48145466, 0.4578275, 0.40821073),
    image_std=(0.26862954, 0.26130258, 0.27577711),
    hf_model_type="clip_vision_model",
    hf_full_model_type="clip",
)
