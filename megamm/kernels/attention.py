"""Attention with the scores materialized (the `attention_backend="unfused"` path): q k^T, the
scaled masked softmax op, dropout, then v. It computes what F.scaled_dot_product_attention computes
(tests/kernels/test_reference.py checks the two against each other) and exists to use and debug the
softmax kernel and to compare against the flash path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamm.kernels.ops import scaled_masked_softmax
from megamm.parallel.random import RNGStatesTracker


def unfused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
    dropout: float,
    rng: RNGStatesTracker,
) -> torch.Tensor:
    """q `[b, heads, s_q, d]`, k and v `[b, groups, s_k, d]` (heads a multiple of groups, each group
    serving that many consecutive query heads, as in sdpa's enable_gqa) -> `[b, heads, s_q, d]`.

    attention_mask: bool broadcastable to `[b, heads, s_q, s_k]`, True = attend. With `causal` and
    no mask, the causal mask is aligned to the first query, as sdpa's is_causal does. Dropout masks
    come from `rng`'s tensor-parallel stream (heads are split over tp)."""
    s_q, s_k = q.shape[2], k.shape[2]
    if causal and attention_mask is None and s_q != s_k:
        # The softmax op aligns causality to the last query; spell sdpa's alignment out instead.
        attention_mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril()
        causal = False
    if k.shape[1] != q.shape[1]:
        repeats = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(repeats, dim=1)
        v = v.repeat_interleave(repeats, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1))
    probs = scaled_masked_softmax(scores, attention_mask, q.shape[-1] ** -0.5, causal)
    if dropout > 0:
        with rng.fork():
            probs = F.dropout(probs, dropout, training=True)
    return torch.matmul(probs, v)
