"""The projection module from vision features to the language model's embedding space."""

from __future__ import annotations

import torch
from torch import nn

from megamm import kernels
from megamm.config import ProjectorConfig
from megamm.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megamm.parallel.sharding import normal_init
from megamm.parallel.state import ParallelState


def pixel_shuffle(features: torch.Tensor, grid: int) -> torch.Tensor:
    """Merge each 2x2 block of patches: `[g*g, n, c] -> [(g/2)^2, n, 4c]`.

    The merged token at block (i, j) concatenates the patches at (2i, 2j), (2i, 2j+1),
    (2i+1, 2j), (2i+1, 2j+1) in that order (row-major within the block).
    """
    tokens, n, c = features.shape
    if tokens != grid * grid or grid % 2:
        raise ValueError(f"pixel shuffle needs an even square grid, got {tokens} tokens for grid {grid}")
    half = grid // 2
    x = features.permute(1, 0, 2).reshape(n, half, 2, half, 2, c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(n, half * half, 4 * c)
    return x.transpose(0, 1).contiguous()


class Projector(nn.Module):
    """`[t, n, c_vision] -> [t', n, h_language]`, replicated across tp.

    linear: one column-parallel linear with gathered output.
    mlp2x_gelu: column-parallel linear -> GELU -> row-parallel linear (one all-reduce), as LLaVA-1.5.
    """

    def __init__(
        self,
        config: ProjectorConfig,
        vision_hidden: int,
        language_hidden: int,
        grid_size: int,
        state: ParallelState,
        init_std: float,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.config = config
        self.grid_size = grid_size
        in_features = vision_hidden * (4 if config.pixel_shuffle else 1)
        common = {"state": state, "init": normal_init(init_std), "bias": config.add_bias, "dtype": dtype}
        if config.type == "linear":
            self.fc1 = ColumnParallelLinear(in_features, language_hidden, gather_output=True, **common)
            self.fc2 = None
        elif config.type == "mlp2x_gelu":
            self.fc1 = ColumnParallelLinear(in_features, language_hidden, **common)
            self.fc2 = RowParallelLinear(language_hidden, language_hidden, **common)
        else:
            raise ValueError(f"unknown projector type {config.type!r}; expected linear or mlp2x_gelu")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.pixel_shuffle:
            features = pixel_shuffle(features, self.grid_size)
        x = self.fc1(features)
        if self.fc2 is not None:
            x = self.fc2(kernels.gelu(x))
        return x
