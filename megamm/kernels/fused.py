"""Autograd wrappers of the CUDA kernels. Callers (`megamm.kernels.ops`) have already checked that
the inputs are supported; these functions only reshape, call the extension and save for backward.

Every backward recomputes from the saved inputs and a few fp32 statistics per row (norms: rstd and
mean; cross entropy: max and sum of exponentials), never from a saved fp32 copy of a large tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamm.config.constants import IGNORE_INDEX
from megamm.kernels.build import load_extension
from megamm.kernels.reference import _all_reduce_
from megamm.parallel.mappings import Group, group_rank

ACTIVATION_KINDS = {"gelu": 0, "gelu_tanh": 1, "quick_gelu": 2}


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = x.contiguous().view(-1, x.shape[-1])
        y, rstd = load_extension().rms_norm_forward(rows, weight.contiguous(), eps)
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        dx, dweight = load_extension().rms_norm_backward(
            dy.contiguous().view_as(rows), rows, weight.contiguous(), rstd
        )
        return dx.view(dy.shape), dweight.view(weight.shape), None


class LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        rows = x.contiguous().view(-1, x.shape[-1])
        y, mean, rstd = load_extension().layer_norm_forward(rows, weight.contiguous(), bias.contiguous(), eps)
        ctx.save_for_backward(rows, weight, mean, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = load_extension().layer_norm_backward(
            dy.contiguous().view_as(rows), rows, weight.contiguous(), mean, rstd
        )
        return dx.view(dy.shape), dweight.view(weight.shape), dbias.view(weight.shape), None


def _rotary_tables(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """cos or sin broadcast to `[s, b, 1, d]` (a view; stride 0 where it was broadcast)."""
    table = table.expand(x.shape[0], x.shape[1], 1, x.shape[3])
    return table if table.stride(3) == 1 else table.contiguous()


class Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = _rotary_tables(x, cos), _rotary_tables(x, sin)
        if cos.stride() != sin.stride():  # the kernel reads both with one set of strides
            cos, sin = cos.contiguous(), sin.contiguous()
        if x.stride(3) != 1:
            x = x.contiguous()
        ctx.save_for_backward(cos, sin)
        return load_extension().rotary(x, cos, sin, False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        grad = grad if grad.stride(3) == 1 else grad.contiguous()
        return load_extension().rotary(grad, cos, sin, True), None, None


class SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x)
        return load_extension().swiglu_forward(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        return load_extension().swiglu_backward(dy.contiguous(), x)


class BiasActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, kind: str) -> torch.Tensor:
        x = x.contiguous()
        bias = None if bias is None else bias.contiguous()
        ctx.kind = ACTIVATION_KINDS[kind]
        ctx.save_for_backward(x, bias)
        return load_extension().bias_activation_forward(x, bias, ctx.kind)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, bias = ctx.saved_tensors
        dx = load_extension().bias_activation_backward(dy.contiguous(), x, bias, ctx.kind)
        dbias = None
        if bias is not None and ctx.needs_input_grad[1]:
            dbias = dx.view(-1, dx.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)
        return dx, dbias, None


class ScaledMaskedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool) -> torch.Tensor:
        probs = load_extension().softmax_forward(scores.contiguous(), mask, scale, causal)
        ctx.scale = scale
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (probs,) = ctx.saved_tensors
        return load_extension().softmax_backward(grad.contiguous(), probs, ctx.scale), None, None, None


class VocabParallelCrossEntropy(torch.autograd.Function):
    """The reference's math with the local work in two kernels: per token, one pass over the local
    logits gives (local max, local sum of exp(x - local max), target logit); the all-reduces combine
    them (sums rescaled to the global max); the backward rewrites softmax - onehot from the logits.
    Nothing of size `[tokens, V/tp]` is allocated but the gradient itself, in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_size: int, group: Group) -> torch.Tensor:
        local_vocab = logits.shape[-1]
        rows = logits.contiguous().view(-1, local_vocab)
        vocab_start = group_rank(group) * local_vocab
        valid = min(local_vocab, max(0, vocab_size - vocab_start))
        flat = target.reshape(-1)
        ignored = flat == IGNORE_INDEX
        local = flat - vocab_start
        off_rank = (local < 0) | (local >= local_vocab) | ignored
        local = local.masked_fill(off_rank, -1).contiguous()

        local_max, local_sum, target_logit = load_extension().cross_entropy_forward(rows, local, valid)
        global_max = local_max.clone()
        _all_reduce_(global_max, group, dist.ReduceOp.MAX)
        # A shard that is all padding has max -inf and sum 0: it contributes nothing.
        rescale = torch.where(local_max == float("-inf"), 0.0, torch.exp(local_max - global_max))
        sum_exp = local_sum * rescale
        _all_reduce_(sum_exp, group)
        _all_reduce_(target_logit, group)
        loss = (sum_exp.log() + global_max - target_logit).masked_fill(ignored, 0.0)

        ctx.valid = valid
        ctx.logits_shape = logits.shape
        ctx.save_for_backward(rows, local, global_max, sum_exp, ignored)
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        rows, local, global_max, sum_exp, ignored = ctx.saved_tensors
        grad_rows = grad_loss.reshape(-1).float().masked_fill(ignored, 0.0).contiguous()
        grad = load_extension().cross_entropy_backward(rows, local, global_max, sum_exp, grad_rows, ctx.valid)
        return grad.view(ctx.logits_shape), None, None, None

