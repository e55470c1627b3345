"""Vision tower families: the conventions around a ViT architecture, one module per family.

A family (megamm.models.towers.base.VisionTowerFamily) holds what a `VisionConfig.family` name
stands for: the image statistics, the architecture flags its Hugging Face form has (class token,
pre-norm, patch bias) and the import defaults built from them, the Hugging Face model types, the
config mapping and the key map. Families are registered in megamm.config.registry.VISION_TOWERS.
The tower module itself (megamm.models.vision.VisionTower) is shared and built from the flags.
"""

from __future__ import annotations

from megamm.config.registry import VISION_TOWERS
from megamm.models.towers.base import VisionTowerFamily


def tower_family(name: str) -> VisionTowerFamily:
    """The family registered as `name` (KeyError listing the known names)."""
    return VISION_TOWERS.get(name)


def family_for_hf_type(model_type: str | None) -> VisionTowerFamily | None:
    """The family whose Hugging Face vision model type (or full model type) is `model_type`."""
    for name in VISION_TOWERS:
        family = tower_family(name)
        if model_type in (family.hf_model_type, family.hf_full_model_type):
            return family
    return None


def supported_hf_types() -> list[str]:
    return sorted(tower_family(name).hf_model_type for name in VISION_TOWERS)
