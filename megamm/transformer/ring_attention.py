"""Ring attention: exact softmax attention over a sequence split across the context-parallel ranks.

Each cp rank holds the queries, keys and values of its two sequence chunks (chunks r and
2cp - 1 - r of 2 x cp, megamm.parallel.context). In cp steps the K/V blocks travel once around the
ring; at each step a rank attends its queries to the block it holds while the next block is in
flight, and merges the partial results through their log-sum-exp:

    lse = logaddexp(lse_a, lse_b),  out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b

so the result is softmax attention over the whole sequence, not an approximation. Backward runs the
ring again: each K/V block travels with the gradient accumulated for it (dK, dV); after a full
turn and one more hop the gradient is home, complete. dQ stays local.

Causality per pair of chunks (query chunk i, key chunk j, global chunk numbers): j < i attends
fully, j == i is the causal diagonal, j > i is skipped; pairs are computed in tiles of query rows. Because every rank holds one early and one
late chunk, every rank computes the same number of blocks. A packed row's mask (True where a query
may attend a key, sample boundaries anywhere) is given as this rank's query rows over the global
key columns, `[b, 1, s/cp, s]`, and each pair reads its `[s/2cp, s/2cp]` slice, so boundaries inside
and across chunks need nothing else. GQA: K/V carry the key/value heads only (what travels is
heads/groups times smaller); each query head uses key/value head `h // (heads / groups)`, the
grouping `scaled_dot_product_attention(enable_gqa=True)` uses.

The per-block math is plain torch in fp32 (scores, mask, log-sum-exp): exact, and what runs on the
CPU. A fused per-block kernel (flash attention returning its log-sum-exp) would replace
`_block_forward` / `_block_backward` on GPU; it is not wired in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from megamm.parallel.context import RingExchange, chunk_ids
from megamm.parallel.state import ParallelState

# Query rows per tile of a chunk pair: bounds the scores held at once (TILE_ROWS x chunk fp32 per
# head) for long sequences; the result does not depend on it.
TILE_ROWS = 1024
FORWARD_TAG = 31
BACKWARD_KV_TAG = 32
BACKWARD_GRAD_TAG = 33


def _tiles(cp: int, rank: int, source: int, chunk: int, causal: bool, mask: torch.Tensor | None,
           device: torch.device) -> Iterator[tuple[slice, slice, torch.Tensor | None]]:
    """The work when this rank's queries meet the K/V block of cp rank `source`: (query rows, key
    columns of the block, allowed mask or None) per tile, skipped pairs left out.

    A pair of chunks is cut into tiles of at most `TILE_ROWS` query rows, so the scores held at
    once are `TILE_ROWS x chunk` whatever the sequence length; on the causal diagonal a tile's keys
    stop at its last row (the rest would be masked). `allowed` (True = may attend) broadcasts to
    `[b, heads, rows, keys]`.
    """
    for qa, q_chunk in enumerate(chunk_ids(cp, rank)):
        for kb, k_chunk in enumerate(chunk_ids(cp, source)):
            if causal and k_chunk > q_chunk:
                continue
            diagonal = causal and k_chunk == q_chunk
            for top in range(0, chunk, TILE_ROWS):
                bottom = min(top + TILE_ROWS, chunk)
                keys = bottom if diagonal else chunk
                allowed = None
                if mask is not None:
                    allowed = mask[..., qa * chunk + top : qa * chunk + bottom, k_chunk * chunk : k_chunk * chunk + keys]
                if diagonal:
                    lower = (torch.arange(top, bottom, device=device)[:, None]
                             >= torch.arange(keys, device=device)[None, :])
                    allowed = lower if allowed is None else allowed & lower
                yield (slice(qa * chunk + top, qa * chunk + bottom), slice(kb * chunk, kb * chunk + keys), allowed)


def _expand(t: torch.Tensor, heads: int) -> torch.Tensor:
    """`[b, groups, s, d]` -> `[b, heads, s, d]`: each key/value head repeated for its query heads."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _fold(t: torch.Tensor, groups: int) -> torch.Tensor:
    """The adjoint of `_expand`: `[b, heads, s, d]` gradients summed over each group's query heads."""
    b, heads, s, d = t.shape
    return t if heads == groups else t.view(b, groups, heads // groups, s, d).sum(dim=2)


def _scores(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None, scale: float) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    return scores if allowed is None else scores.masked_fill(~allowed, float("-inf"))


def _probabilities(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(scores - lse), 0 where a row attends nothing (lse = -inf)."""
    finite = torch.isfinite(lse).unsqueeze(-1)
    return torch.where(finite, torch.exp(scores - torch.where(finite, lse.unsqueeze(-1), 0.0)), 0.0)


def _block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair: q `[b, h, c, d]`, k, v `[b, h, c, d]` (fp32) -> (out `[b, h, c, d]`, lse `[b, h, c]`)."""
    scores = _scores(q, k, allowed, scale)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(_probabilities(scores, lse), v), lse


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold a block's (out, lse) into the running (out, lse) of the same query rows, in place."""
    merged = torch.logaddexp(lse, block_lse)
    finite = torch.isfinite(merged)
    safe = torch.where(finite, merged, 0.0)
    keep = torch.where(finite, torch.exp(lse - safe), 0.0).unsqueeze(-1)
    take = torch.where(finite, torch.exp(block_lse - safe), 0.0).unsqueeze(-1)
    out.mul_(keep).add_(block_out * take)
    lse.copy_(merged)


def _block_backward(q, k, v, out, d_out, delta, lse, allowed, scale):
    """One pair's gradients (fp32): returns (dq, dk, dv) of its `[b, h, c, d]` blocks, where `out`,
    `lse` and `delta` = rowsum(d_out * out) are those of the whole attention (the final merge)."""
    p = _probabilities(_scores(q, k, allowed, scale), lse)
    dv = torch.matmul(p.transpose(-1, -2), d_out)
    ds = p * (torch.matmul(d_out, v.transpose(-1, -2)) - delta.unsqueeze(-1))
    dq = torch.matmul(ds, k) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, state: ParallelState, causal: bool):
        cp, rank = state.cp_size, state.cp_rank
        heads, groups = q.shape[1], k.shape[1]
        chunk = q.shape[2] // 2
        scale = 1.0 / math.sqrt(q.shape[-1])
        qf = q.float()
        out = torch.zeros_like(qf)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        ring = RingExchange(state, FORWARD_TAG)
        for step in range(cp):
            if step < cp - 1:
                ring.start(kv)
            source = (rank - step) % cp
            kf, vf = (_expand(t.float(), heads) for t in kv)
            for rows, cols, allowed in _tiles(cp, rank, source, chunk, causal, mask, q.device):
                block_out, block_lse = _block_forward(qf[:, :, rows], kf[:, :, cols], vf[:, :, cols], allowed, scale)
                _merge(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
            if step < cp - 1:
                kv = ring.wait()
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.state, ctx.causal, ctx.groups, ctx.scale = state, causal, groups, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        state, causal, groups, scale = ctx.state, ctx.causal, ctx.groups, ctx.scale
        cp, rank = state.cp_size, state.cp_rank
        heads, chunk = q.shape[1], q.shape[2] // 2
        qf, d_out = q.float(), d_out.float()
        delta = (d_out * out).sum(dim=-1)
        dq = torch.zeros_like(qf)
        kv = torch.stack([k, v])
        kv_ring = RingExchange(state, BACKWARD_KV_TAG)
        grad_ring = RingExchange(state, BACKWARD_GRAD_TAG)
        d_kv = None
        for step in range(cp):
            if step < cp - 1:
                kv_ring.start(kv)
            source = (rank - step) % cp
            kf, vf = (_expand(t.float(), heads) for t in kv)
            dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
            for rows, cols, allowed in _tiles(cp, rank, source, chunk, causal, mask, q.device):
                block = _block_backward(qf[:, :, rows], kf[:, :, cols], vf[:, :, cols], out[:, :, rows],
                                        d_out[:, :, rows], delta[:, :, rows], lse[:, :, rows], allowed, scale)
                dq[:, :, rows] += block[0]
                dk[:, :, cols] += block[1]
                dv[:, :, cols] += block[2]
            # The block's gradient so far arrives from the rank that held it last step (none at step
            # 0: the block is this rank's own); add this rank's part and pass it on with the block.
            part = torch.stack([_fold(dk, groups), _fold(dv, groups)])
            d_kv = part if step == 0 else grad_ring.wait() + part
            grad_ring.start(d_kv)
            if step < cp - 1:
                kv = kv_ring.wait()
        # After a full turn the last hop brings every rank its own block's complete gradient.
        d_kv = grad_ring.wait() if cp > 1 else d_kv
        return dq.to(q.dtype), d_kv[0].to(k.dtype), d_kv[1].to(v.dtype), None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: ParallelState, causal: bool = True,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the sequence split across `state`'s cp ranks.

    q `[b, heads, s/cp, d]`, k and v `[b, groups, s/cp, d]` (this rank's two chunks, local order);
    mask: None, or bool `[b or 1, 1, s/cp, s]` (this rank's query rows over the global key
    positions, True = may attend; combined with causality when `causal`). Returns `[b, heads, s/cp, d]`
    in q's dtype.
    """
    if q.shape[2] % 2:
        raise ValueError(f"ring attention: {q.shape[2]} local positions do not split into two chunks")
    if mask is not None and mask.shape[-1] != q.shape[2] * state.cp_size:
        raise ValueError(f"ring attention: mask {tuple(mask.shape)} must cover the {q.shape[2] * state.cp_size} "
                         "global key positions")
    return _RingAttention.apply(q, k, v, mask, state, causal)
