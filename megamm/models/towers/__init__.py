"""Vision tower families: the conventions around a ViT architecture, one module per family.

A family (megamm.models.towers.base.VisionTowerFamily) holds what a `VisionConfig.family` name
stands for: the image statistics, the architecture flags its Hugging Face form has (class token,
pre-norm, patch bias) and the import defaults built from them, the Hugging Face model types, the
config mapping and the key map. Families are registered in megamm.config.registry.VISION_TOWERS.
The ViT tower module (megamm.models.vision.VisionTower) is shared and built from the flags; the
native-resolution families (qwen2_vl, qwen2_5_vl: megamm.models.towers.qwen2_vl.NativeTowerFamily)
have their own module, megamm.models.native_vision.NativeResolutionTower.
"""

from __future__ import annotations

from megamm.config.registry import VISION_TOWERS
from megamm.models.towers.base import VisionTowerFamily
from megamm.models.towers.qwen2_vl import NativeTowerFamily


def tower_family(name: str) -> VisionTowerFamily | NativeTowerFamily:
    """The family registered as `name` (KeyError listing the known names)."""
    return VISION_TOWERS.get(name)


def _vit_families() -> list[VisionTowerFamily]:
    """The ViT families, the ones the vision-tower and LLaVA converters read (a native-resolution
    family has no converter yet, only its key map)."""
    return [f for f in (tower_family(name) for name in VISION_TOWERS) if isinstance(f, VisionTowerFamily)]


def family_for_hf_type(model_type: str | None) -> VisionTowerFamily | None:
    """The ViT family whose Hugging Face vision model type (or full model type) is `model_type`."""
    for family in _vit_families():
        if model_type in (family.hf_model_type, family.hf_full_model_type):
            return family
    return None


def supported_hf_types() -> list[str]:
    return sorted(family.hf_model_type for family in _vit_families())
