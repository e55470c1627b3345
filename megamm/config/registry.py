"""Registries: the names of the pluggable parts, listed without importing their implementations.

Each entry maps a name to `"package.module:attribute"`. The config layer validates names against
these tables and prints them in `--help`; the layer that uses a part resolves it with `get`, which
imports the module only then. So the config layer never imports models, data or conversion code,
and adding a part is its own module plus one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Registry:
    """Named implementations of one kind of part (chat templates, vision towers, ...)."""

    kind: str
    entries: Mapping[str, str]

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def unknown(self, name: object, where: str | None = None) -> str:
        """The error line for a name that is not registered (`where`: the flag or field given)."""
        prefix = f"{where}: " if where else ""
        return f"{prefix}unknown {self.kind} {name!r}; known: {', '.join(self.names())}"

    def get(self, name: str) -> Any:
        """Import and return the implementation registered as `name` (KeyError listing the names)."""
        if name not in self.entries:
            raise KeyError(self.unknown(name))
        module, attribute = self.entries[name].split(":")
        return getattr(importlib.import_module(module), attribute)


CHAT_TEMPLATES = Registry(
    "chat template",
    {
        "plain": "megamm.data.templates:PLAIN",
        "llava_v1": "megamm.data.templates:LLAVA_V1",
        "vicuna_v1": "megamm.data.templates:LLAVA_V1",
        "llama3": "megamm.data.templates:LLAMA3",
        "chatml": "megamm.data.templates:CHATML",
        "mistral": "megamm.data.templates:MISTRAL",
        "qwen2_vl": "megamm.data.qwen_template:QWEN2_VL",
        "internvl": "megamm.data.internvl_template:INTERNVL",
    },
)
# Chat templates that can put NVLM-style tags before each tile (--tile-tags; `with_tile_tags`).
TILE_TAG_TEMPLATES = ("internvl",)

# Vision tower families (megamm.models.towers): the ViT conventions a VisionConfig's `family` names
# (image statistics, Hugging Face model types, key map, defaults). qwen2_vl and qwen2_5_vl are
# native-resolution towers (VisionConfig.native_resolution, megamm.models.native_vision).
VISION_TOWERS = Registry(
    "vision tower family",
    {
        "clip": "megamm.models.towers.clip:CLIP",
        "siglip": "megamm.models.towers.siglip:SIGLIP",
        "qwen2_vl": "megamm.models.towers.qwen2_vl:QWEN2_VL",
        "qwen2_5_vl": "megamm.models.towers.qwen2_vl:QWEN2_5_VL",
        "internvit": "megamm.models.towers.internvit:INTERNVIT",
    },
)

# Projectors (megamm.models.projectors): ProjectorConfig.type -> the module class.
PROJECTORS = Registry(
    "projector",
    {
        "linear": "megamm.models.projectors.linear:LinearProjector",
        "mlp2x_gelu": "megamm.models.projectors.mlp:Mlp2xGeluProjector",
        "internvl_mlp": "megamm.models.projectors.internvl:InternVLProjector",
    },
)

# Language-model families (megamm.models.decoders): LanguageConfig.family -> the family's Hugging
# Face config mapping, key names and refusal rules. All run on the shared TransformerLayer.
LANGUAGE_MODELS = Registry(
    "language-model family",
    {
        "llama": "megamm.models.decoders.llama:LLAMA",
        "mistral": "megamm.models.decoders.mistral:MISTRAL",
        "qwen2": "megamm.models.decoders.qwen2:QWEN2",
    },
)

# Hugging Face (and original LLaVA / Meta) checkpoint layouts the converter reads or writes
# (megamm.convert.adapters): one adapter per layout, holding its config mapping, key spelling and
# refusal rules.
HF_ARCHITECTURES = Registry(
    "Hugging Face architecture",
    {
        "llava-hf": "megamm.convert.adapters.llava_hf:ADAPTER",
        "llava-next-hf": "megamm.convert.adapters.llava_next_hf:ADAPTER",
        "llava-onevision-hf": "megamm.convert.adapters.llava_onevision_hf:ADAPTER",
        "original-llava": "megamm.convert.adapters.original_llava:ADAPTER",
        "vision-tower": "megamm.convert.adapters.vision_tower:ADAPTER",
        "causal-lm": "megamm.convert.adapters.causal_lm:ADAPTER",
        "meta-llama": "megamm.convert.adapters.meta_llama:ADAPTER",
        "qwen2-vl-hf": "megamm.convert.adapters.qwen2_vl_hf:ADAPTER",
        "qwen2.5-vl-hf": "megamm.convert.adapters.qwen2_5_vl_hf:ADAPTER",
        "internvl-hf": "megamm.convert.adapters.internvl_hf:ADAPTER",
    },
)
