"""Canonical tensor names, and megamm parameters <-> canonical tensors for a whole LlavaModel.

Canonical names drop the nesting that differs between checkpoint layouts and transformers versions:

    vision.<CLIP/SigLIP vision key without "vision_model.">   vision.encoder.layers.0.self_attn.q_proj.weight
    projector.linear_<i>.weight|bias                           the i-th projector linear (1-based)
    image_newline                                              LLaVA-NeXT's row-end embedding
    text.<causal LM key without "model.">, text.lm_head.weight  text.layers.3.mlp.gate_proj.weight

Each adapter (megamm.convert.adapters) maps its layout's key spelling to these; each family maps
its component's megamm parameters to them (megamm.models.towers, megamm.models.decoders), and the
projector's i-th layer is `projector.linear_<i>`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megamm.config import LlavaConfig
from megamm.convert import ConversionError
from megamm.models.decoders import decoder_family
from megamm.models.keymap import Entry
from megamm.models.projectors import projector_class
from megamm.models.towers import tower_family


def rename(key: str, prefixes: tuple[tuple[str, str], ...]) -> str | None:
    """The first matching prefix replaced (None: no prefix matches); a vision key also loses the
    "vision_model." nesting, which only some layouts and transformers versions write."""
    for old, new in prefixes:
        if key.startswith(old):
            name = new + key[len(old):]
            if name.startswith("vision.vision_model."):
                name = "vision." + name[len("vision.vision_model."):]
            return name
    return None


def projector_entries(config: LlavaConfig) -> list[Entry]:
    """The projector's entries (none for a native-resolution tower, whose merger the tower maps)."""
    if config.projector is None:
        return []
    kinds = ("weight", "bias") if config.projector.add_bias else ("weight",)
    projector = projector_class(config.projector)
    norms = [Entry(f"projector.{norm}.{k}", (f"projector.{norm}.{k}",)) for norm in projector.norms
             for k in ("weight", "bias")]
    return norms + [Entry(f"projector.{layer}.{k}", (f"projector.linear_{i}.{k}",))
                    for i, layer in enumerate(projector.layers, start=1) for k in kinds]


def model_entries(config: LlavaConfig, with_projector: bool = True) -> list[Entry]:
    """Every megamm parameter of a whole (all stages) LlavaModel, in a fixed order."""
    vision = tower_family(config.vision.family).entries(config.vision)
    language = decoder_family(config.language.family).entries(config.language)
    # LLaVA-NeXT's newline embedding (megamm.models.anyres) sits on the first stage, after the projector.
    anyres = [Entry("anyres.image_newline", ("image_newline",))] if config.anyres is not None else []
    return vision + (projector_entries(config) if with_projector else []) + anyres + language


def kept_aside(config: LlavaConfig, name: str) -> bool:
    """A canonical tensor of the source that LLaVA never reads, kept (`hf_extra/`) for export."""
    return tower_family(config.vision.family).kept_aside(name)


def derived(config: LlavaConfig, name: str) -> bool:
    """A canonical tensor megamm derives instead of converting (old checkpoints' rotary tables)."""
    return decoder_family(config.language.family).derived(name)


def installed_key_map(architecture: str, model_type: str, hf_config: dict,
                      canonical_name: Callable[[str], str | None]) -> dict[str, str]:
    """Canonical name -> key of the installed transformers' `architecture` for `hf_config`, read from
    the model built on the meta device (no memory), so the export writes the keys this transformers
    version loads. ConversionError for a key `canonical_name` does not know."""
    import transformers
    from transformers import AutoConfig

    tree = {k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        model = getattr(transformers, architecture)(AutoConfig.for_model(model_type, **tree))
    out = {}
    for key in model.state_dict():
        name = canonical_name(key)
        if name is None:
            raise ConversionError(f"transformers' {architecture} has a key {key} this exporter does not know")
        out[name] = key
    return out
