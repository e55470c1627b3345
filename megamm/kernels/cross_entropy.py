"""Cross entropy over logits whose vocabulary is split across tensor-parallel ranks.

The full `[s, b, V]` logits never exist on one rank: each rank holds `[s, b, V_pad/tp]`, and the
softmax normalizer, the max (for stability) and the target logit are combined with three small
all-reduces over `[s, b]`. Columns past the real vocabulary (padding) are excluded from the
softmax, so padding the vocabulary never changes the loss.
"""

from __future__ import annotations

import torch

from megamm import kernels
from megamm.parallel.mappings import Group

__all__ = ["vocab_parallel_cross_entropy"]


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, vocab_size: int, group: Group
) -> torch.Tensor:
    """Per-token loss (fp32) for vocab-split `logits`.

    logits: `[..., V_pad/tp]` (any leading shape), this rank's contiguous slice of the vocabulary.
    target: `[...]` int64 global token ids, `IGNORE_INDEX` (-100) where no loss is wanted.
    vocab_size: the real vocabulary size; columns at or past it are padding.
    Returns `[...]`, zero at ignored positions. Averaging is the caller's job (training averages
    over all tokens of the global batch, not per microbatch).

    The math is `megamm.kernels.reference.vocab_parallel_cross_entropy`; where enabled on GPU a fused
    kernel computes it without an fp32 copy of the logits (`megamm.kernels`).
    """
    return kernels.vocab_parallel_cross_entropy(logits, target, vocab_size, group)
