"""The adapter interfaces: reading a layout's keys, and (for export targets) writing them."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from megamm.config import LlavaConfig
from megamm.convert.hf_config import HfExtras


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
    """A layout the exporter also writes."""

    @abstractmethod
    def export_problems(self, config: LlavaConfig) -> list[str]:
        """Why `config` has no form in this layout (empty: it exports)."""

    @abstractmethod
    def config_to_hf(self, config: LlavaConfig, extras: HfExtras, kept_aside: list[str]) -> dict:
        """The config.json tree (`kept_aside`: canonical names of the tensors the import kept)."""

    @abstractmethod
    def installed_keys(self, hf_config: dict) -> dict[str, str]:
        """Canonical name -> key of the installed transformers' model for `hf_config` (in memory)."""

    @abstractmethod
    def legacy_key(self, name: str) -> str:
        """Canonical name -> the key spelling every supported transformers version loads."""

    @abstractmethod
    def export_fill(self, config: LlavaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Canonical tensors the layout needs and megamm has no value for (written when the import
        kept none)."""
