"""A CLIP / SigLIP directory: a vision model (clip_vision_model, siglip_vision_model) or a full
model (clip, siglip) whose vision part is used. Keys: `[vision_model.]*`; the full model's text
tower, projections and logit scale are not part of LLaVA and are skipped by name."""

from __future__ import annotations

import re

from megamm.config import VisionConfig
from megamm.convert import ConversionError
from megamm.convert.adapters.base import Adapter
from megamm.convert.hf_config import hf_config, raise_problems
from megamm.models.towers import family_for_hf_type, supported_hf_types

NOT_VISION = re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale$|logit_bias$)")


def vision_config_from_hf(tree: dict, select_layer: int, keep_class_token: bool, where: str) -> VisionConfig:
    """A vision config tree (or a full model's, whose vision_config is used) -> VisionConfig of the
    family that has its model type."""
    family = family_for_hf_type(tree.get("model_type"))
    if family is not None and tree.get("model_type") == family.hf_full_model_type:
        tree = {**(tree.get("vision_config") or {}), "model_type": family.hf_model_type}
        where = f"{where} vision_config"
    if family is None:
        raise ConversionError(f"{where}: unsupported vision architecture {tree.get('model_type')!r}; supported: "
                              f"{', '.join(supported_hf_types())} (or the full model)")
    problems: list[str] = []
    config = family.config_from_hf(hf_config(tree, where), select_layer, keep_class_token, where, problems)
    raise_problems(problems)
    return config


class VisionTowerAdapter(Adapter):
    name = "vision-tower"

    def canonical_name(self, key: str) -> str | None:
        return None if NOT_VISION.match(key) else "vision." + key.removeprefix("vision_model.")

    def not_llava(self, key: str) -> bool:
        return bool(NOT_VISION.match(key))


ADAPTER = VisionTowerAdapter()
