"""Language-model families, one module per family: the Hugging Face config mapping, key names,
refusal rules and defaults of a decoder that megamm runs on its shared TransformerLayer.

Families are registered in megamm.config.registry.LANGUAGE_MODELS under `LanguageConfig.family`.
"""

from __future__ import annotations

from megamm.config.registry import LANGUAGE_MODELS
from megamm.models.decoders.base import DecoderFamily


def decoder_family(name: str) -> DecoderFamily:
    """The family registered as `name` (KeyError listing the known names)."""
    return LANGUAGE_MODELS.get(name)


def family_for_hf_type(model_type: str | None) -> DecoderFamily | None:
    """The family whose Hugging Face model_type is `model_type` (None: no family has it)."""
    for name in LANGUAGE_MODELS:
        family = decoder_family(name)
        if family.hf_model_type == model_type:
            return family
    return None


def supported_hf_types() -> list[str]:
    return sorted(decoder_family(name).hf_model_type for name in LANGUAGE_MODELS)
