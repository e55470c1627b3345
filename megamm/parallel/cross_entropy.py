"""Cross entropy over logits whose vocabulary is split across tensor-parallel ranks.

The full `[s, b, V]` logits never exist on one rank: each rank holds `[s, b, V_pad/tp]`, and the
softmax normalizer, the max (for stability) and the target logit are combined with three small
all-reduces over `[s, b]`. Columns past the real vocabulary (padding) are excluded from the
softmax, so padding the vocabulary never changes the loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megamm.parallel.mappings import Group, group_rank, group_size

IGNORE_INDEX = -100


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
    """Per-token loss (fp32) for vocab-split `logits`.

    logits: `[..., V_pad/tp]` (any leading shape), this rank's contiguous slice of the vocabulary.
    target: `[...]` int64 global token ids, `IGNORE_INDEX` (-100) where no loss is wanted.
    vocab_size: the real vocabulary size; columns at or past it are padding.
    Returns `[...]`, zero at ignored positions. Averaging is the caller's job (training averages
    over all tokens of the global batch, not per microbatch).
    """
    if group_size(group) == 1:
        # One rank holds the whole vocabulary: torch's fused kernel, on the real columns only.
        real = logits[..., :vocab_size].float()
        loss = F.cross_entropy(real.reshape(-1, vocab_size), target.reshape(-1), reduction="none",
                               ignore_index=IGNORE_INDEX)
        return loss.view(target.shape)
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_size, group)
