"""The linear projector (LLaVA-1.0): one column-parallel linear with gathered output."""

from __future__ import annotations

import torch

from megamm.config import ProjectorConfig
from megamm.models.projectors.base import Projector
from megamm.parallel.layers import ColumnParallelLinear
from megamm.parallel.sharding import normal_init
from megamm.parallel.state import ParallelState


class LinearProjector(Projector):
    layers = ("fc1",)

    def __init__(self, config: ProjectorConfig, vision_hidden: int, language_hidden: int, grid_size: int,
                 state: ParallelState, init_std: float, dtype: torch.dtype) -> None:
        super().__init__(config, vision_hidden, language_hidden, grid_size, state, init_std, dtype)
        self.fc1 = ColumnParallelLinear(self.in_features, language_hidden, state=state, init=normal_init(init_std),
                                        bias=config.add_bias, gather_output=True, dtype=dtype)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc1(features)

    @staticmethod
    def flops_per_token(in_features: int, language_hidden: int) -> float:
        return 2 * in_features * language_hidden
