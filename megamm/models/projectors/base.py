"""The projector interface: optional pixel shuffle, then the type's layers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from megamm.config import ProjectorConfig
from megamm.models.projectors.pixel_shuffle import pixel_shuffle
from megamm.parallel.state import ParallelState


class Projector(nn.Module, ABC):
    """`[t, n, c_vision] -> [t / merged_patches, n, h_language]`, replicated across tp.

    layers: the linear layers in order (parameter names `projector.<layer>.weight|bias`); converters
    map the i-th to a LLaVA checkpoint's i-th projector linear.
    norms: LayerNorms (weight and bias) a checkpoint names as megamm does, `projector.<norm>.*`.
    """

    layers: ClassVar[tuple[str, ...]]
    norms: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ProjectorConfig, vision_hidden: int, language_hidden: int, grid_size: int,
                 state: ParallelState, init_std: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.grid_size = grid_size
        self.in_features = vision_hidden * config.merged_patches

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.pixel_shuffle:
            features = pixel_shuffle(features, self.grid_size)
        return self.project(features)

    @abstractmethod
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """`[t', n, in_features] -> [t', n, h_language]`."""

    @staticmethod
    @abstractmethod
    def flops_per_token(in_features: int, language_hidden: int) -> float:
        """Forward matmul FLOPs per image token (2 per multiply-add)."""
