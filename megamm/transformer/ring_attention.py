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
fully, j == i is the causal diagonal, j > i is skipped. Because every rank holds one early and one
late chunk, every rank computes the same number of blocks. A packed row's mask (True where a query
may attend a key, sample boundaries anywhere) is given as this rank's query rows over the global
key columns, `[b, 1, s/cp, s]`, and each pair reads its `[s/2cp, s/2cp]` slice, so boundaries inside
and across chunks need nothing else. The training batches give packed rows in the O(s) form instead:
segment ids `[b, s]` over the whole sequence (`PackedRows`; the model never cuts them, every cp rank
has the whole microbatch), and each tile's mask is derived when the tile runs, by comparing the ids
of its query rows with those of its key columns (the K/V block's global positions are known from
its source rank, so the ids need not travel with it). Nothing of `[s/cp, s]` is built or saved for
backward; a tile's mask is `TILE_ROWS x chunk` (packed pairs are tiled on the fused path too),
transient like its scores.

GQA: K/V carry the key/value heads only (what travels is heads/groups times smaller); each query
head uses key/value head `h // (heads / groups)`, the grouping
`scaled_dot_product_attention(enable_gqa=True)` uses.

Per block, on the CPU: torch's fused flash-attention kernel for CPU
(`aten._scaled_dot_product_flash_attention_for_cpu`, which returns the block's log-sum-exp, and its
backward, which takes the merged output and log-sum-exp), so no block's scores are held whole.
Elsewhere (and with `FUSED_CPU = False`) the plain torch path in fp32 (scores, mask, log-sum-exp) in
tiles of `TILE_ROWS` query rows. On CUDA the plain path runs too: a fused GPU kernel per block
(flash / memory-efficient attention with their log-sum-exp) is not wired in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from megamm.parallel.context import RingExchange, chunk_ids
from megamm.parallel.state import ParallelState
from megamm.transformer.segments import PackedRows

# Query rows per tile of a chunk pair on the plain path and of a packed row's pairs on either path:
# bounds the scores and the mask held at once (TILE_ROWS x chunk) for long sequences; the result
# does not depend on it.
TILE_ROWS = 1024
# Use torch's fused CPU flash-attention kernel per block where it exists (it returns the block's
# log-sum-exp and takes the merged output and log-sum-exp in backward); False forces the plain path.
FUSED_CPU = True
FORWARD_TAG = 31
BACKWARD_KV_TAG = 32
BACKWARD_GRAD_TAG = 33


def _fused(q: torch.Tensor) -> bool:
    """Whether this block math runs on the fused CPU kernel (torch's flash attention for CPU)."""
    return FUSED_CPU and q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _tile_rows(q: torch.Tensor, chunk: int, packed: bool) -> int:
    """Query rows per tile. The fused kernel tiles internally, so without a mask a chunk pair is one
    call; a packed row's mask (and the fused kernel's additive copy of it) is materialized per tile,
    so tiles stay `TILE_ROWS x chunk` there on either path: the transient mask grows with s, not s^2."""
    return chunk if _fused(q) and not packed else TILE_ROWS


def _tiles(cp: int, rank: int, source: int, chunk: int, causal: bool, mask: torch.Tensor | None,
           segments: PackedRows | None, device: torch.device,
           tile_rows: int) -> Iterator[tuple[slice, slice, torch.Tensor | None, bool]]:
    """The work when this rank's queries meet the K/V block of cp rank `source`: (query rows, key
    columns of the block, allowed, causal_square) per tile, skipped pairs left out.

    A pair of chunks is cut into tiles of at most `tile_rows` query rows, so the scores held at
    once are `tile_rows x chunk` whatever the sequence length; on the causal diagonal a tile's keys
    stop at its last row (the rest would be masked). `allowed` (True = may attend) broadcasts to
    `[b, heads, rows, keys]`; it is None with `causal_square` True for a whole diagonal pair without
    a packed mask (plain causal attention of a square block, which the fused kernel takes as a flag)
    and None with `causal_square` False where every query attends every key. Packed rows come as
    this rank's rows of a mask (`mask`) or as segment ids (`segments`), from which a tile's mask is
    derived by comparing the ids of its query rows and key columns.
    """
    packed = mask is not None or segments is not None
    for qa, q_chunk in enumerate(chunk_ids(cp, rank)):
        for kb, k_chunk in enumerate(chunk_ids(cp, source)):
            if causal and k_chunk > q_chunk:
                continue
            diagonal = causal and k_chunk == q_chunk
            for top in range(0, chunk, tile_rows):
                bottom = min(top + tile_rows, chunk)
                keys = bottom if diagonal else chunk
                rows, cols = slice(qa * chunk + top, qa * chunk + bottom), slice(kb * chunk, kb * chunk + keys)
                if diagonal and not packed and top == 0 and bottom == chunk:
                    yield rows, cols, None, True
                    continue
                allowed = None
                key_positions = slice(k_chunk * chunk, k_chunk * chunk + keys)
                if mask is not None:
                    allowed = mask[..., rows, key_positions]
                elif segments is not None:
                    allowed = segments.allowed(slice(q_chunk * chunk + top, q_chunk * chunk + bottom), key_positions)
                if diagonal:
                    lower = (torch.arange(top, bottom, device=device)[:, None]
                             >= torch.arange(keys, device=device)[None, :])
                    allowed = lower if allowed is None else allowed & lower
                yield rows, cols, allowed, False


def _additive(allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The fused kernel's mask: 0 where a query may attend, -inf elsewhere."""
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


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


def _square_causal(allowed: torch.Tensor | None, causal_square: bool, rows: int,
                   device: torch.device) -> torch.Tensor | None:
    """The plain path's mask of a tile: the lower triangle of a whole diagonal pair, else `allowed`."""
    return torch.ones(rows, rows, dtype=torch.bool, device=device).tril() if causal_square else allowed


def _block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                   causal_square: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile: q `[b, h, r, d]`, k, v `[b, h, k, d]` -> (out `[b, h, r, d]`, lse `[b, h, r]`), fp32."""
    if _fused(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal_square, attn_mask=_additive(allowed, q.dtype), scale=scale)
        if allowed is not None:
            # The kernel gives a row that attends nothing lse 0; the merge needs -inf (no weight).
            lse = torch.where(allowed.any(dim=-1), lse, float("-inf"))
        return out.float(), lse.float()
    q, k, v = q.float(), k.float(), v.float()
    scores = _scores(q, k, _square_causal(allowed, causal_square, q.shape[2], q.device), scale)
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


def _block_backward(q, k, v, out, d_out, lse, allowed, causal_square, scale):
    """One tile's gradients (fp32): returns (dq, dk, dv) of its q `[b, h, r, d]` and k, v
    `[b, h, k, d]`, where `out` and `lse` are those of the whole attention (the final merge), which is
    what makes a block's probabilities exp(scores - lse) its share of the full softmax."""
    if _fused(q):
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            d_out.to(q.dtype), q, k, v, out.to(q.dtype), lse, 0.0, causal_square,
            attn_mask=_additive(allowed, q.dtype), scale=scale)
        return tuple(g.float() for g in grads)
    q, k, v = q.float(), k.float(), v.float()
    delta = (d_out * out).sum(dim=-1)
    p = _probabilities(_scores(q, k, _square_causal(allowed, causal_square, q.shape[2], q.device), scale), lse)
    dv = torch.matmul(p.transpose(-1, -2), d_out)
    ds = p * (torch.matmul(d_out, v.transpose(-1, -2)) - delta.unsqueeze(-1))
    dq = torch.matmul(ds, k) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, segments, state: ParallelState, causal: bool):
        cp, rank = state.cp_size, state.cp_rank
        heads, groups = q.shape[1], k.shape[1]
        chunk = q.shape[2] // 2
        scale = 1.0 / math.sqrt(q.shape[-1])
        tile_rows = _tile_rows(q, chunk, mask is not None or segments is not None)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        ring = RingExchange(state, FORWARD_TAG)
        for step in range(cp):
            if step < cp - 1:
                ring.start(kv)
            source = (rank - step) % cp
            kx, vx = (_expand(t, heads) for t in kv)
            for rows, cols, allowed, square in _tiles(cp, rank, source, chunk, causal, mask, segments, q.device,
                                                      tile_rows):
                block_out, block_lse = _block_forward(q[:, :, rows], kx[:, :, cols], vx[:, :, cols], allowed,
                                                      square, scale)
                _merge(out[:, :, rows], lse[:, :, rows], block_out, block_lse)
            if step < cp - 1:
                kv = ring.wait()
        ctx.save_for_backward(q, k, v, out, lse, mask, None if segments is None else segments.ids)
        ctx.state, ctx.causal, ctx.groups, ctx.scale = state, causal, groups, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, mask, ids = ctx.saved_tensors
        state, causal, groups, scale = ctx.state, ctx.causal, ctx.groups, ctx.scale
        segments = None if ids is None else PackedRows(ids)
        cp, rank = state.cp_size, state.cp_rank
        heads, chunk = q.shape[1], q.shape[2] // 2
        tile_rows = _tile_rows(q, chunk, mask is not None or segments is not None)
        d_out = d_out.float()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        kv_ring = RingExchange(state, BACKWARD_KV_TAG)
        grad_ring = RingExchange(state, BACKWARD_GRAD_TAG)
        d_kv = None
        for step in range(cp):
            if step < cp - 1:
                kv_ring.start(kv)
            source = (rank - step) % cp
            kx, vx = (_expand(t, heads) for t in kv)
            dk = torch.zeros(kx.shape, dtype=torch.float32, device=q.device)
            dv = torch.zeros_like(dk)
            for rows, cols, allowed, square in _tiles(cp, rank, source, chunk, causal, mask, segments, q.device,
                                                      tile_rows):
                block = _block_backward(q[:, :, rows], kx[:, :, cols], vx[:, :, cols], out[:, :, rows],
                                        d_out[:, :, rows], lse[:, :, rows], allowed, square, scale)
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
        return dq.to(q.dtype), d_kv[0].to(k.dtype), d_kv[1].to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: ParallelState, causal: bool = True,
                   mask: torch.Tensor | None = None, segments: PackedRows | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the sequence split across `state`'s cp ranks.

    q `[b, heads, s/cp, d]`, k and v `[b, groups, s/cp, d]` (this rank's two chunks, local order);
    packed rows as either mask: bool `[b or 1, 1, s/cp, s]` (this rank's query rows over the global
    key positions, True = may attend; combined with causality when `causal`), or segments: the
    rows' segment ids over the whole sequence (O(s); a query attends the keys of its own segment).
    Returns `[b, heads, s/cp, d]` in q's dtype.
    """
    if q.shape[2] % 2:
        raise ValueError(f"ring attention: {q.shape[2]} local positions do not split into two chunks")
    if mask is not None and segments is not None:
        raise ValueError("ring attention: give packed rows as a mask or as segment ids, not both")
    if mask is not None and mask.shape[-1] != q.shape[2] * state.cp_size:
        raise ValueError(f"ring attention: mask {tuple(mask.shape)} must cover the {q.shape[2] * state.cp_size} "
                         "global key positions")
    if segments is not None and tuple(segments.ids.shape) != (q.shape[0], q.shape[2] * state.cp_size):
        raise ValueError(f"ring attention: segment ids {tuple(segments.ids.shape)} must be [batch {q.shape[0]}, "
                         f"the {q.shape[2] * state.cp_size} global positions]")
    return _RingAttention.apply(q, k, v, mask, segments, state, causal)
