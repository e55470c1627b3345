"""LLaVA-1.5's mlp2x_gelu projector: column-parallel linear -> GELU -> row-parallel linear (one
all-reduce)."""

from __future__ import annotations

import torch

from megamm import kernels
from megamm.config import ProjectorConfig
from megamm.models.projectors.base import Projector
from megamm.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megamm.parallel.sharding import normal_init
from megamm.parallel.state import ParallelState


class Mlp2xGeluProjector(Projector):
    layers = ("fc1", "fc2")

    def __init__(self, config: ProjectorConfig, vision_hidden: int, language_hidden: int, grid_size: int,
                 state: ParallelState, init_std: float, dtype: torch.dtype) -> None:
        super().__init__(config, vision_hidden, language_hidden, grid_size, state, init_std, dtype)
        common = {"state": state, "init": normal_init(init_std), "bias": config.add_bias, "dtype": dtype}
        self.fc1 = ColumnParallelLinear(self.in_features, language_hidden, **common)
        self.fc2 = RowParallelLinear(language_hidden, language_hidden, **common)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(kernels.gelu(self.fc1(features)))

    @staticmethod
    def flops_per_token(in_features: int, language_hidden: int) -> float:
        return 2 * in_features * language_hidden + 2 * language_hidden * language_hidden
