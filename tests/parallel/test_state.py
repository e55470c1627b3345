"""Process groups, autograd collectives and the RNG tracker on real gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megamm.parallel import mappings
from megamm.parallel.state import initialize_parallel_state, rank_layout
from tests.distributed import run_distributed


def _groups_job() -> dict:
    """tp=2, pp=2 over 4 ranks: report each group's members as torch sees them."""
    state = initialize_parallel_state(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    return {
        "tp": dist.get_process_group_ranks(state.tp_group),
        "dp": dist.get_process_group_ranks(state.dp_group),
        "pp": dist.get_process_group_ranks(state.pp_group),
        "ranks": (state.tp_rank, state.dp_rank, state.pp_rank),
        "sizes": (state.tp_size, state.dp_size, state.pp_size),
    }


@pytest.mark.slow
def test_groups_follow_tp_dp_pp_order() -> None:
    results = run_distributed(_groups_job, 4)
    for rank, result in enumerate(results):
        assert result["sizes"] == (2, 1, 2)
        assert result["ranks"] == (rank % 2, 0, rank // 2)
        assert result["tp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert result["pp"] == [rank % 2, rank % 2 + 2]
        assert result["dp"] == [rank]


def test_rank_layout_tp2_dp2_pp2() -> None:
    layout = rank_layout(8, tp=2, pp=2)
    assert layout["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout["mp"] == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_rank_layout_rejects_sizes_that_do_not_tile() -> None:
    with pytest.raises(ValueError, match="world size 6 is not divisible"):
        rank_layout(6, tp=4, pp=1)


def _mappings_job() -> dict:
    """Each mapping's forward and backward on known inputs; x = rank+1 everywhere."""
    state = initialize_parallel_state(tensor_model_parallel_size=2)
    group, rank = state.tp_group, state.tp_rank
    out = {}

    def run(fn, shape, *extra):
        x = torch.full(shape, float(rank + 1), requires_grad=True)
        y = fn(x, group, *extra)
        weights = torch.arange(y.numel(), dtype=torch.float32).view_as(y)
        (y * weights).sum().backward()
        return y.detach(), x.grad

    out["copy"] = run(mappings.copy_to_tensor_parallel_region, (2, 3))
    out["reduce"] = run(mappings.reduce_from_tensor_parallel_region, (2, 3))
    out["scatter_last"] = run(mappings.scatter_to_tensor_parallel_region, (2, 4))
    out["gather_last"] = run(mappings.gather_from_tensor_parallel_region, (2, 2))
    out["scatter_seq"] = run(mappings.scatter_to_sequence_parallel_region, (4, 1))
    out["gather_seq_partial"] = run(mappings.gather_from_sequence_parallel_region, (2, 1), True)
    out["gather_seq_split"] = run(mappings.gather_from_sequence_parallel_region, (2, 1), False)
    out["reduce_scatter_seq"] = run(mappings.reduce_scatter_to_sequence_parallel_region, (4, 1))
    return out


@pytest.mark.slow
def test_autograd_collectives_forward_and_backward() -> None:
    results = run_distributed(_mappings_job, 2)
    w6 = torch.arange(6.0).view(2, 3)
    for rank, out in enumerate(results):
        x = float(rank + 1)
        y, g = out["copy"]
        assert torch.equal(y, torch.full((2, 3), x)) and torch.equal(g, 2 * w6)
        y, g = out["reduce"]
        assert torch.equal(y, torch.full((2, 3), 3.0)) and torch.equal(g, w6)
        y, g = out["scatter_last"]
        assert y.shape == (2, 2)
        # Backward all-gathers every rank's grad of its slice (both weighted 0..3).
        assert torch.equal(g, torch.arange(4.0).view(2, 2).repeat(1, 2))
        y, g = out["gather_last"]
        assert torch.equal(y, torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2]]))
        assert torch.equal(g, torch.arange(8.0).view(2, 4)[:, 2 * rank : 2 * rank + 2])
        y, g = out["scatter_seq"]
        assert y.shape == (2, 1)
        assert torch.equal(g.flatten(), torch.tensor([0.0, 1, 0, 1]))
        y, g = out["gather_seq_partial"]
        assert torch.equal(y.flatten(), torch.tensor([1.0, 1, 2, 2]))
        # Both ranks weight the gathered output identically, so the reduce-scatter doubles it.
        assert torch.equal(g.flatten(), 2 * torch.arange(4.0)[2 * rank : 2 * rank + 2])
        y, g = out["gather_seq_split"]
        assert torch.equal(g.flatten(), torch.arange(4.0)[2 * rank : 2 * rank + 2])
        y, g = out["reduce_scatter_seq"]
        assert torch.equal(y, torch.full((2, 1), 3.0))
        assert torch.equal(g.flatten(), torch.tensor([0.0, 1, 0, 1]))


def _rng_job() -> dict:
    state = initialize_parallel_state(tensor_model_parallel_size=2)
    state.seed(42)
    outside_before = torch.rand(4)
    with state.rng.fork():
        inside = torch.rand(4)
    outside_after = torch.rand(4)
    dropout = torch.nn.functional.dropout(torch.ones(64), 0.5)
    return {"outside": torch.cat([outside_before, outside_after, dropout]), "inside": inside}


@pytest.mark.slow
def test_rng_tracker_differs_inside_tp_region_only() -> None:
    first, second = run_distributed(_rng_job, 2)
    assert torch.equal(first["outside"], second["outside"]), "replicated regions must draw the same numbers"
    assert not torch.equal(first["inside"], second["inside"]), "tp ranks must draw different numbers"


def test_rank_layout_orders_tp_cp_dp_pp() -> None:
    """Megatron's order: tp fastest, then cp, then dp, then pp (tp=2, cp=2, dp=2, pp=2 on 16 ranks)."""
    layout = rank_layout(16, tp=2, pp=2, cp=2)
    assert layout["tp"][:2] == [[0, 1], [2, 3]]
    assert layout["cp"][:3] == [[0, 2], [1, 3], [4, 6]]
    assert layout["dp"][:3] == [[0, 4], [1, 5], [2, 6]]
    assert layout["dp_cp"][:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout["pp"][:2] == [[0, 8], [1, 9]]
    assert layout["mp"][:2] == [[0, 1, 8, 9], [2, 3, 10, 11]]
    assert layout["embedding_dp"][0] == [0, 2, 4, 6, 8, 10, 12, 14]
    with pytest.raises(ValueError, match="context-parallel size 3"):
        rank_layout(8, tp=2, pp=1, cp=3)
