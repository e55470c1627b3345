"""InternVL's projector (transformers' InternVLMultiModalProjector): LayerNorm over the pixel-shuffled
features, then column-parallel linear -> GELU -> row-parallel linear (one all-reduce).

The 2x2 pixel shuffle before it is ProjectorConfig.pixel_shuffle (InternVL's downsample ratio 0.5):
megamm's merge concatenates a block's patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1), the
channel order transformers' `pixel_shuffle` produces. The LayerNorm runs on the replicated features
(its grads are complete on every tp rank) with nn.LayerNorm's default eps.
"""

from __future__ import annotations

import torch

from megamm import kernels
from megamm.config import ProjectorConfig
from megamm.models.projectors.base import Projector
from megamm.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megamm.parallel.sharding import normal_init
from megamm.parallel.state import ParallelState
from megamm.transformer.norm import Norm

# nn.LayerNorm's default, which InternVLMultiModalProjector's layer_norm uses.
LAYER_NORM_EPSILON = 1e-5


class InternVLProjector(Projector):
    layers = ("fc1", "fc2")
    norms = ("layer_norm",)

    def __init__(self, config: ProjectorConfig, vision_hidden: int, language_hidden: int, grid_size: int,
                 state: ParallelState, init_std: float, dtype: torch.dtype) -> None:
        super().__init__(config, vision_hidden, language_hidden, grid_size, state, init_std, dtype)
        self.layer_norm = Norm(self.in_features, "layernorm", LAYER_NORM_EPSILON, state, sequence_parallel=False,
                               dtype=dtype)
        common = {"state": state, "init": normal_init(init_std), "bias": config.add_bias, "dtype": dtype}
        self.fc1 = ColumnParallelLinear(self.in_features, language_hidden, **common)
        self.fc2 = RowParallelLinear(language_hidden, language_hidden, **common)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(kernels.gelu(self.fc1(self.layer_norm(features))))

    @staticmethod
    def flops_per_token(in_features: int, language_hidden: int) -> float:
        return 2 * in_features * language_hidden + 2 * language_hidden * language_hidden
