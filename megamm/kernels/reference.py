"""Plain torch references of the fused ops: the specification each CUDA kernel is tested against,
and what runs wherever a kernel is not used (CPU, unsupported dtypes or shapes, kernels not enabled).

These are the model's original formulas, unchanged, so routing the model through `megamm.kernels`
changes nothing on the CPU (tests/kernels/test_reference.py compares them bit for bit with the
previous code). Where the reference rounds an intermediate to the input dtype (RMSNorm's normalized
row, SwiGLU's silu, quick-GELU's sigmoid) the kernels round at the same place.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megamm.config.constants import IGNORE_INDEX
from megamm.parallel.mappings import Group, group_rank, group_size

QUICK_GELU_COEFF = 1.702


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`[..., h] -> [..., h]`: normalized in fp32, cast back to x's dtype, then scaled by `weight [h]`
    (as Hugging Face's LLaMA RMSNorm does)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """`[..., h] -> [..., h]`: layer norm in fp32 (weight, bias `[h]`), returned in x's dtype."""
    out = F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps)
    return out.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: `[s, b, heads, d]`; cos, sin: `[s, b, 1, d]` (gathered per position, so offsets and packed
    restarts are already in them). Computed in fp32, returned in x's dtype."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """`[..., 2f] -> [..., f]`: silu(gate) * up on the fused fc1 output `[gate | up]`."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """GELU of `x + bias` (bias `[n]` over the last dim, optional); approximate: "none" (erf) or "tanh"."""
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate=approximate)


def quick_gelu(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU, of `x + bias` (bias optional)."""
    if bias is not None:
        x = x + bias
    return x * torch.sigmoid(QUICK_GELU_COEFF * x)


def allowed_keys(
    mask: torch.Tensor | None, causal: bool, s_q: int, s_k: int, device: torch.device
) -> torch.Tensor | None:
    """Bool, broadcastable to `[b, heads, s_q, s_k]`, True where a query may attend a key; None if all.

    Causality is aligned to the last query (query i sees keys up to i + s_k - s_q), which is what a
    generation step attending to its cached keys needs."""
    if causal:
        lower = torch.ones(s_q, s_k, dtype=torch.bool, device=device).tril(s_k - s_q)
        mask = lower if mask is None else mask & lower
    return mask


def scaled_masked_softmax(
    scores: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool
) -> torch.Tensor:
    """softmax(scale * scores) over the last dim of `scores [b, heads, s_q, s_k]`, restricted to the
    allowed keys (`mask` bool broadcastable to the scores, True = attend; combined with `causal`).

    Computed in fp32 and returned in the scores' dtype. A row with no allowed key is all zeros rather
    than NaN (a padded query then contributes nothing instead of poisoning the gradients)."""
    x = scores.float() * scale
    allowed = allowed_keys(mask, causal, scores.shape[-2], scores.shape[-1], scores.device)
    if allowed is None:
        return torch.softmax(x, dim=-1).to(scores.dtype)
    probs = torch.softmax(x.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = probs.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    return probs.to(scores.dtype)


def _all_reduce_(x: torch.Tensor, group: Group, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_size: int, group: Group):
        logits = logits.float()
        local_vocab = logits.shape[-1]
        vocab_start = group_rank(group) * local_vocab
        padding_columns = min(local_vocab, max(0, vocab_start + local_vocab - vocab_size))
        if padding_columns:
            logits = logits.clone()
            logits[..., local_vocab - padding_columns :] = float("-inf")

        logits_max = logits.max(dim=-1).values
        _all_reduce_(logits_max, group, dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)

        ignored = target == IGNORE_INDEX
        local_target = target - vocab_start
        off_rank = (local_target < 0) | (local_target >= local_vocab) | ignored
        local_target = local_target.masked_fill(off_rank, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(off_rank, 0.0)
        _all_reduce_(target_logit, group)

        exp_logits = shifted.exp()
        sum_exp = exp_logits.sum(dim=-1)
        _all_reduce_(sum_exp, group)
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, off_rank, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_target, off_rank, ignored = ctx.saved_tensors
        grad = softmax
        on_rank = (~off_rank).unsqueeze(-1).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -on_rank)
        scale = grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1)
        return grad.mul_(scale), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, vocab_size: int, group: Group
) -> torch.Tensor:
    """Per-token loss (fp32) for vocab-split `logits` `[..., V_pad/tp]` (this rank's contiguous slice)
    and global `target` ids `[...]` (`IGNORE_INDEX` where no loss is wanted); columns at or past
    `vocab_size` are padding. Returns `[...]`, zero at ignored positions.

    The max, the sum of exponentials and the target logit are combined over `group` with three
    all-reduces over `[...]`; the fp32 softmax `[..., V_pad/tp]` is kept for the backward (the fused
    kernel avoids both that copy and the fp32 cast of the logits)."""
    if group_size(group) == 1:
        # One rank holds the whole vocabulary: torch's fused kernel, on the real columns only.
        real = logits[..., :vocab_size].float()
        loss = F.cross_entropy(real.reshape(-1, vocab_size), target.reshape(-1), reduction="none",
                               ignore_index=IGNORE_INDEX)
        return loss.view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_size, group)
