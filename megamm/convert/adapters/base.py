"""The adapter interfaces: reading a layout's keys, and (for export targets) writing them."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from megamm.config import LlavaConfig
from megamm.convert.hf_config import HfExtras
from megamm.convert.hf_keys import rename


class Adapter(ABC):
    """A checkpoint layout the importer reads."""

    name: str

    @abstractmethod
    def canonical_name(self, key: str) -> str | None:
        """The canonical name of a source key (None: the key is not one this layout spells)."""

    def not_llava(self, key: str) -> bool:
        """A source tensor that belongs to the source model but not to a LLaVA model (skipped and
        named in the summary, e.g. a full CLIP model's text tower)."""
        return False


class ExportAdapter(Adapter):
    """A layout the exporter also writes.

    `LEGACY_PREFIXES`: (canonical-name prefix, key prefix) pairs, first match first, that spell a
    canonical name the way every supported transformers version loads (`legacy_key`).
    """

    LEGACY_PREFIXES: tuple[tuple[str, str], ...]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not hasattr(cls, "LEGACY_PREFIXES"):
            raise TypeError(f"{cls.__name__}: an ExportAdapter declares its LEGACY_PREFIXES")

    @abstractmethod
    def export_problems(self, config: LlavaConfig) -> list[str]:
        """Why `config` has no form in this layout (empty: it exports)."""

    @abstractmethod
    def config_to_hf(self, config: LlavaConfig, extras: HfExtras, kept_aside: list[str]) -> dict:
        """The config.json tree (`kept_aside`: canonical names of the tensors the import kept)."""

    @abstractmethod
    def installed_keys(self, hf_config: dict) -> dict[str, str]:
        """Canonical name -> key of the installed transformers' model for `hf_config` (in memory)."""

    def legacy_key(self, name: str) -> str:
        """Canonical name -> the key spelling every supported transformers version loads."""
        key = rename(name, self.LEGACY_PREFIXES)
        if key is None:
            raise ValueError(f"not a canonical name: {name}")
        return key

    @abstractmethod
    def export_fill(self, config: LlavaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Canonical tensors the layout needs and megamm has no value for (written when the import
        kept none)."""
