"""LayerNorm and RMSNorm with megamm parameter layouts.

Both normalize in fp32 and cast back, which matches Hugging Face's LLaMA RMSNorm and keeps bf16
training stable (the math is `megamm.kernels.reference`; on GPU a fused kernel may run instead, see
`megamm.kernels`). Under sequence parallelism each tp rank normalizes its own sequence chunk, so
the weight's gradient is a partial sum: its record (`ParamSpec.sequence_partial_grad`) says so and
the grads are all-reduced across tp (`megamm.parallel.grads.allreduce_sequence_parallel_grads`).
"""

from __future__ import annotations

import torch
from torch import nn

from megamm import kernels
from megamm.config import TransformerConfig
from megamm.parallel.params import ParamOwner, ParamSpec
from megamm.parallel.sharding import ParamLayout, constant_init
from megamm.parallel.state import ParallelState


class Norm(ParamOwner):
    """`[..., h] -> [..., h]`: layernorm (weight and bias) or rmsnorm (weight only)."""

    def __init__(
        self,
        hidden_size: int,
        kind: str,
        eps: float,
        state: ParallelState,
        sequence_parallel: bool,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        if kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"unknown normalization {kind!r}; expected layernorm or rmsnorm")
        self.kind = kind
        self.eps = eps
        partial_grads = sequence_parallel

        def param(name: str, value: float) -> nn.Parameter:
            spec = ParamSpec(ParamLayout((hidden_size,), constant_init(value)), sequence_partial_grad=partial_grads)
            return self.create_parameter(name, spec, state, dtype)

        self.weight = param("weight", 1.0)
        self.bias = param("bias", 0.0) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return kernels.rms_norm(x, self.weight, self.eps)


def build_norm(config: TransformerConfig, state: ParallelState, sequence_parallel: bool) -> Norm:
    return Norm(
        config.hidden_size,
        config.normalization,
        config.norm_epsilon,
        state,
        sequence_parallel,
        config.params_dtype,
    )
