"""Ring attention over cp = 2 and cp = 4 equals full attention, forward and backward.

One spawned job of 4 ranks: a cp=2 state (two rings of two) and a cp=4 state (one ring). Every rank
builds the same full q, k, v and output gradient, runs `scaled_dot_product_attention` on the whole
sequence (the reference), and ring attention on its own positions; its outputs and its positions'
gradients of q, k and v must equal the reference's. Both block paths run: the fused CPU kernel
(the default on CPU) and the plain torch path (forced, in small tiles); packed rows as this rank's
rows of a dense mask and as segment ids (the O(s) form).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megamm.data.packing import block_causal_mask, segment_ids
from megamm.parallel.context import local_positions, split_sequence
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.transformer import ring_attention as ring
from megamm.transformer.ring_attention import ring_attention
from megamm.transformer.segments import PackedRows
from tests.distributed import run_distributed

TOLERANCE = 1e-5
SEQ = 48  # 2 x cp chunks of 12 (cp=2) or 6 (cp=4)


def _inputs(heads: int, groups: int, batch: int = 2, dim: int = 8):
    generator = torch.Generator().manual_seed(heads * 10 + groups)
    q = torch.randn(batch, heads, SEQ, dim, generator=generator)
    k = torch.randn(batch, groups, SEQ, dim, generator=generator)
    v = torch.randn(batch, groups, SEQ, dim, generator=generator)
    d_out = torch.randn(batch, heads, SEQ, dim, generator=generator)
    return q, k, v, d_out


PACKED_ROWS = ([0, 5, 19, 31, 44], [0, 30, 37])  # boundaries inside chunks, across chunks, trailing padding


def _packed_mask() -> torch.Tensor:
    """The two packed rows `[2, 1, s, s]`."""
    return torch.stack([block_causal_mask(bounds, SEQ) for bounds in PACKED_ROWS])[:, None]


def _packed_segments() -> PackedRows:
    """The same rows as segment ids `[2, s]` (the O(s) form)."""
    return PackedRows(torch.stack([segment_ids(bounds, SEQ) for bounds in PACKED_ROWS]))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def _case(state: ParallelState, heads: int, groups: int, mask: torch.Tensor | None, causal: bool = True,
          segments: PackedRows | None = None) -> dict:
    """Ring attention against full attention; with `segments` the ring takes the packed rows as
    segment ids while the reference takes `mask` (the same rows, dense)."""
    q, k, v, d_out = _inputs(heads, groups)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    reference_mask = mask
    if causal:
        lower = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
        reference_mask = lower if mask is None else mask & lower
    expected = F.scaled_dot_product_attention(*full, attn_mask=reference_mask, enable_gqa=groups != heads)
    expected.backward(d_out)
    local = [split_sequence(t, state, dim=2).clone().requires_grad_() for t in (q, k, v)]
    local_mask = None if mask is None or segments is not None else split_sequence(mask, state, dim=2)
    out = ring_attention(*local, state, causal=causal, mask=local_mask, segments=segments)
    out.backward(split_sequence(d_out, state, dim=2))
    errors = {"out": _relative(out, split_sequence(expected, state, dim=2))}
    for name, mine, reference in zip("qkv", local, full):
        errors[f"d{name}"] = _relative(mine.grad, split_sequence(reference.grad, state, dim=2))
    return errors


def _job() -> dict:
    initialize_parallel_state()
    results = {}
    for cp in (2, 4):
        state = ParallelState.from_groups(tp=1, pp=1, device=torch.device("cpu"), cp=cp)
        results[f"cp{cp}_causal"] = _case(state, heads=4, groups=4, mask=None)
        results[f"cp{cp}_gqa"] = _case(state, heads=8, groups=2, mask=None)
        results[f"cp{cp}_packed_gqa"] = _case(state, heads=4, groups=2, mask=_packed_mask())
        results[f"cp{cp}_segments_gqa"] = _case(state, heads=4, groups=2, mask=_packed_mask(),
                                                segments=_packed_segments())
        results[f"cp{cp}_bidirectional"] = _case(state, heads=4, groups=4, mask=None, causal=False)
        # Packed rows on the fused kernel in tiles of 5 query rows (a packed row's mask is cut in
        # tiles on either path).
        ring.TILE_ROWS, rows = 5, ring.TILE_ROWS
        results[f"cp{cp}_fused_tiled_segments"] = _case(state, heads=4, groups=2, mask=_packed_mask(),
                                                        segments=_packed_segments())
        ring.TILE_ROWS = rows
        # The plain path (what runs off the CPU) in tiles of 5 query rows: uneven tiles of every
        # chunk pair, diagonal keys cut at each tile.
        ring.FUSED_CPU, ring.TILE_ROWS, rows = False, 5, ring.TILE_ROWS
        results[f"cp{cp}_plain_tiled_packed"] = _case(state, heads=4, groups=2, mask=_packed_mask())
        results[f"cp{cp}_plain_tiled_segments"] = _case(state, heads=4, groups=2, mask=_packed_mask(),
                                                        segments=_packed_segments())
        results[f"cp{cp}_plain_tiled_causal"] = _case(state, heads=8, groups=2, mask=None)
        results[f"cp{cp}_plain_bidirectional"] = _case(state, heads=4, groups=4, mask=None, causal=False)
        ring.FUSED_CPU, ring.TILE_ROWS = True, rows
        results[f"cp{cp}_positions"] = local_positions(SEQ, cp, state.cp_rank).tolist()
    return results


@pytest.fixture(scope="module")
def ring_results() -> list[dict]:
    return run_distributed(_job, 4)


@pytest.mark.parametrize("case", ["causal", "gqa", "packed_gqa", "segments_gqa", "fused_tiled_segments",
                                  "bidirectional", "plain_tiled_packed", "plain_tiled_segments",
                                  "plain_tiled_causal", "plain_bidirectional"])
@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_equals_full_attention(ring_results: list[dict], cp: int, case: str) -> None:
    for rank, results in enumerate(ring_results):
        for name, error in results[f"cp{cp}_{case}"].items():
            assert error < TOLERANCE, f"rank {rank} cp={cp} {case}: {name} relative error {error}"


def test_ranks_hold_an_early_and_a_late_chunk(ring_results: list[dict]) -> None:
    """Rank r holds chunks r and 2cp-1-r, so together the ranks cover the sequence once."""
    chunk = SEQ // 8
    cp4 = [results["cp4_positions"] for results in ring_results]
    assert cp4[0] == list(range(chunk)) + list(range(7 * chunk, 8 * chunk))
    assert cp4[3] == list(range(3 * chunk, 4 * chunk)) + list(range(4 * chunk, 5 * chunk))
    assert sorted(p for positions in cp4 for p in positions) == list(range(SEQ))
