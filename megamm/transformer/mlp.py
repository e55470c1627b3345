"""The feed-forward block: column-parallel fc1, activation, row-parallel fc2."""

from __future__ import annotations

import torch
from torch import nn

from megamm import kernels
from megamm.config import TransformerConfig
from megamm.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megamm.parallel.sharding import normal_init, scaled_init
from megamm.parallel.state import ParallelState

# Ops of megamm.kernels: the torch reference, or a fused kernel where one is enabled.
ELEMENTWISE_ACTIVATIONS = {
    "gelu": kernels.gelu,
    "gelu_tanh": kernels.gelu_tanh,
    "quick_gelu": kernels.quick_gelu,
}


class MLP(nn.Module):
    """`[s', b, h] -> [s', b, h]`; fc1 holds `[gate; up]` fused for swiglu (each split over tp)."""

    def __init__(self, config: TransformerConfig, state: ParallelState, sequence_parallel: bool) -> None:
        super().__init__()
        ffn = config.ffn_hidden_size
        self.gated = config.activation == "swiglu"
        if not self.gated and config.activation not in ELEMENTWISE_ACTIVATIONS:
            raise ValueError(f"unknown activation {config.activation!r}")
        self.activation = None if self.gated else ELEMENTWISE_ACTIVATIONS[config.activation]
        self.fc1 = ColumnParallelLinear(
            config.hidden_size,
            2 * ffn if self.gated else ffn,
            state=state,
            init=normal_init(config.init_method_std),
            bias=config.add_bias_linear,
            sequence_parallel=sequence_parallel,
            fused_parts=(ffn, ffn) if self.gated else None,
            dtype=config.params_dtype,
        )
        self.fc2 = RowParallelLinear(
            ffn,
            config.hidden_size,
            state=state,
            init=scaled_init(config.init_method_std, config.num_layers),
            bias=config.add_bias_linear,
            sequence_parallel=sequence_parallel,
            dtype=config.params_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if self.gated:
            hidden = kernels.swiglu(hidden)
        else:
            hidden = self.activation(hidden)
        return self.fc2(hidden)
