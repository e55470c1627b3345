"""The ops the model calls. Each runs its fused CUDA kernel when the kernel is enabled
(`megamm.kernels.dispatch`) and supports the inputs, and its torch reference otherwise, so a CPU
tensor, an fp64 tensor or an unusual layout always gets the reference's answer.

Support checks are cheap attribute tests; the extension is loaded (and, the first time on a node,
built) only when a kernel is about to run on CUDA tensors. Inside a region torch.compile traces
(--torch-compile's layers) every op is its reference: the extension's ops are opaque to the tracer,
and inductor fuses the reference's element-wise math itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from megamm.kernels import fused, reference
from megamm.kernels.build import KernelBuildError, load_extension
from megamm.kernels.dispatch import current_mode, enabled, norm_backward_bytes_fit
from megamm.parallel.mappings import Group

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROWS = 2**31 - 1  # one CUDA block per row: the grid's x limit


def _floating_cuda(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """x is a CUDA tensor of a supported dtype and every other tensor matches its device and dtype."""
    if not (x.is_cuda and x.dtype in SUPPORTED_DTYPES):
        return False
    return all(t is None or (t.device == x.device and t.dtype == x.dtype) for t in others)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0


_warned = False


def _use_kernel(name: str, supported: Callable[[], bool]) -> bool:
    """Whether to run kernel `name`: enabled, inputs supported, extension loadable."""
    global _warned
    if torch.compiler.is_compiling() or not enabled(name) or not supported():
        return False
    try:
        load_extension()
    except KernelBuildError as error:
        if current_mode().explicit:
            raise
        if not _warned:
            warnings.warn(f"{error}\nUsing the torch references.", RuntimeWarning, stacklevel=3)
            _warned = True
        return False
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`[..., h] -> [..., h]`; see `reference.rms_norm`."""

    def supported() -> bool:
        h = x.shape[-1] if x.dim() else 0
        return (
            _floating_cuda(x, weight) and h > 0 and tuple(weight.shape) == (h,) and _rows(x) <= MAX_ROWS
            and norm_backward_bytes_fit(x.device, h, layernorm=False)
        )

    if _use_kernel("rms_norm", supported):
        return fused.RMSNorm.apply(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """`[..., h] -> [..., h]`; see `reference.layer_norm`."""

    def supported() -> bool:
        h = x.shape[-1] if x.dim() else 0
        return (
            _floating_cuda(x, weight, bias) and h > 0 and tuple(weight.shape) == (h,)
            and tuple(bias.shape) == (h,) and _rows(x) <= MAX_ROWS
            and norm_backward_bytes_fit(x.device, h, layernorm=True)
        )

    if _use_kernel("layer_norm", supported):
        return fused.LayerNorm.apply(x, weight, bias, eps)
    return reference.layer_norm(x, weight, bias, eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[s, b, heads, d]`, cos/sin `[s, b, 1, d]` (or broadcastable to it); see `reference.apply_rotary`."""

    def table_ok(t: torch.Tensor) -> bool:
        return (
            t.is_cuda and t.device == x.device and t.dtype == torch.float32 and t.dim() == 4
            and t.shape[0] in (1, x.shape[0]) and t.shape[1] in (1, x.shape[1]) and t.shape[2] == 1
            and t.shape[3] == x.shape[3] and not t.requires_grad
        )

    def supported() -> bool:
        return (
            _floating_cuda(x) and x.dim() == 4 and x.shape[3] % 2 == 0 and x.shape[3] > 0
            and table_ok(cos) and table_ok(sin)
        )

    if _use_kernel("rotary", supported):
        return fused.Rotary.apply(x, cos, sin)
    return reference.apply_rotary(x, cos, sin)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """`[..., 2f] -> [..., f]`; see `reference.swiglu`."""

    def supported() -> bool:
        return _floating_cuda(x) and x.dim() > 0 and x.shape[-1] % 2 == 0

    if _use_kernel("swiglu", supported):
        return fused.SwiGLU.apply(x)
    return reference.swiglu(x)


def _bias_ok(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return _floating_cuda(x, bias) and x.dim() > 0 and (bias is None or tuple(bias.shape) == (x.shape[-1],))


def gelu(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """GELU of `x + bias`; see `reference.gelu`."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    if _use_kernel("gelu", lambda: _bias_ok(x, bias)):
        return fused.BiasActivation.apply(x, bias, "gelu" if approximate == "none" else "gelu_tanh")
    return reference.gelu(x, bias, approximate)


def gelu_tanh(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The tanh approximation of GELU (`gelu(x, bias, "tanh")`)."""
    return gelu(x, bias, approximate="tanh")


def quick_gelu(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x * sigmoid(1.702 x) of `x + bias`; see `reference.quick_gelu`."""
    if _use_kernel("gelu", lambda: _bias_ok(x, bias)):
        return fused.BiasActivation.apply(x, bias, "quick_gelu")
    return reference.quick_gelu(x, bias)


def _mask_ok(scores: torch.Tensor, mask: torch.Tensor | None) -> bool:
    if mask is None:
        return True
    if mask.dtype != torch.bool or mask.device != scores.device or mask.dim() > 4:
        return False
    try:
        return torch.broadcast_shapes(mask.shape, scores.shape) == scores.shape
    except RuntimeError:
        return False


def scaled_masked_softmax(
    scores: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool
) -> torch.Tensor:
    """softmax over the allowed keys of `scale * scores [b, heads, s_q, s_k]`; see
    `reference.scaled_masked_softmax`."""

    def supported() -> bool:
        return _floating_cuda(scores) and scores.dim() == 4 and _rows(scores) <= MAX_ROWS and _mask_ok(scores, mask)

    if _use_kernel("softmax", supported):
        return fused.ScaledMaskedSoftmax.apply(scores, mask, scale, causal)
    return reference.scaled_masked_softmax(scores, mask, scale, causal)


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, vocab_size: int, group: Group
) -> torch.Tensor:
    """Per-token fp32 loss of vocab-split logits; see `reference.vocab_parallel_cross_entropy`."""

    def supported() -> bool:
        return (
            _floating_cuda(logits) and logits.dim() > 0 and logits.shape[-1] > 0
            and target.device == logits.device and target.dtype == torch.int64
            and tuple(target.shape) == tuple(logits.shape[:-1]) and _rows(logits) <= MAX_ROWS
        )

    if _use_kernel("cross_entropy", supported):
        return fused.VocabParallelCrossEntropy.apply(logits, target, vocab_size, group)
    return reference.vocab_parallel_cross_entropy(logits, target, vocab_size, group)

