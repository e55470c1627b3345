"""Fused ops of the model (norms, rotary, activations, attention softmax, cross entropy).

`megamm.kernels.ops` holds the ops the model calls, each dispatching between a fused CUDA kernel
(megamm/csrc, built by `megamm.kernels.build`) and its torch reference (`megamm.kernels.reference`,
the specification); `megamm.kernels.dispatch` decides which kernels are enabled (only GPU-verified
ones by default; `MEGAMM_KERNELS` overrides). See docs/kernels.md.
"""

from megamm.kernels.dispatch import KERNELS, VERIFIED, kernel_mode, set_mode
from megamm.kernels.ops import (
    apply_rotary,
    gelu,
    gelu_tanh,
    layer_norm,
    quick_gelu,
    rms_norm,
    scaled_masked_softmax,
    swiglu,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "KERNELS",
    "VERIFIED",
    "apply_rotary",
    "gelu",
    "gelu_tanh",
    "kernel_mode",
    "layer_norm",
    "quick_gelu",
    "rms_norm",
    "scaled_masked_softmax",
    "set_mode",
    "swiglu",
    "vocab_parallel_cross_entropy",
]
