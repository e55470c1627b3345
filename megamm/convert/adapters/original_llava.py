"""The original LLaVA layout (haotian-liu/LLaVA's LlavaLlamaForCausalLM): a LLaMA/Mistral causal LM
whose config carries the `mm_*` fields, with the projector at `model.mm_projector` (`.0` and `.2`
of a Sequential for mlp2x_gelu, bare for linear) and the tower in the directory `mm_vision_tower`
names (read with the vision-tower adapter) unless its weights are inside, at
`model.vision_tower.vision_tower.*`.

Refused: projector types other than linear / mlp2x_gelu, feature selections other than patch /
cls_patch, any-resolution tiling (LLaVA-NeXT).
"""

from __future__ import annotations

from dataclasses import dataclass

from megamm.config import LanguageConfig, ProjectorConfig
from megamm.convert import ConversionError
from megamm.convert.adapters.base import Adapter
from megamm.convert.adapters.causal_lm import language_config_from_hf
from megamm.convert.hf_config import HfExtras, raise_problems
from megamm.convert.hf_keys import rename

PREFIXES = (
    ("model.mm_projector.0.", "projector.linear_1."),
    ("model.mm_projector.2.", "projector.linear_2."),
    ("model.mm_projector.", "projector.linear_1."),
    ("model.vision_tower.vision_tower.", "vision."),
    ("model.", "text."),
    ("lm_head.", "text.lm_head."),
)
# model_type -> the language-model family's Hugging Face model type.
TEXT_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral", "llava": "llama"}
PROJECTORS = ("linear", "mlp2x_gelu")


@dataclass
class OriginalLlava:
    """What an original LLaVA config.json says."""

    language: LanguageConfig
    extras: HfExtras
    projector: ProjectorConfig
    select_layer: int
    keep_class_token: bool


class OriginalLlavaAdapter(Adapter):
    name = "original-llava"

    def canonical_name(self, key: str) -> str | None:
        return rename(key, PREFIXES)

    def config_from_hf(self, tree: dict, where: str) -> OriginalLlava:
        model_type = tree.get("model_type")
        if model_type not in TEXT_TYPES:
            raise ConversionError(f"{where}: model_type {model_type!r} is not an original LLaVA model "
                                  f"({', '.join(TEXT_TYPES)})")
        problems = []
        projector_type = tree.get("mm_projector_type", "linear")
        if projector_type not in PROJECTORS:
            problems.append(f"{where}: mm_projector_type {projector_type!r}: megamm has {' and '.join(PROJECTORS)}")
        feature = tree.get("mm_vision_select_feature", "patch")
        if feature not in ("patch", "cls_patch"):
            problems.append(f"{where}: mm_vision_select_feature {feature!r}: expected patch or cls_patch")
        if tree.get("image_aspect_ratio") == "anyres" or tree.get("mm_patch_merge_type", "flat") != "flat":
            problems.append(f"{where}: any-resolution tiling (LLaVA-NeXT) is not part of this model")
        raise_problems(problems)
        text = {k: v for k, v in tree.items() if not k.startswith("mm_")}
        text["model_type"] = TEXT_TYPES[model_type]
        language, extras = language_config_from_hf(text, where)
        return OriginalLlava(language, extras, ProjectorConfig(type=projector_type, add_bias=True),
                             int(tree.get("mm_vision_select_layer", -2)), feature == "cls_patch")


ADAPTER = OriginalLlavaAdapter()
