"""Single-process checks of sharding, tensor-parallel layers and the vocab-parallel loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megamm.kernels.cross_entropy import vocab_parallel_cross_entropy
from megamm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    pad_vocab_size,
)
from megamm.parallel.params import initialize_parameters
from megamm.parallel.sharding import (
    ParamLayout,
    normal_init,
    parameter_seed,
    shard_master,
    unshard_local,
)
from megamm.parallel.state import ParallelState


def test_fused_shard_keeps_whole_parts_per_rank() -> None:
    """QKV with GQA: q has 4 rows, k and v 2 each; tp=2 rank r gets [q_r; k_r; v_r]."""
    master = torch.arange(8.0).view(8, 1)
    layout = ParamLayout((8, 1), normal_init(1.0), partition_dim=0, fused_parts=(4, 2, 2))
    rank0 = shard_master(master, layout, 0, 2).flatten().tolist()
    rank1 = shard_master(master, layout, 1, 2).flatten().tolist()
    assert rank0 == [0, 1, 4, 6]
    assert rank1 == [2, 3, 5, 7]
    assert torch.equal(unshard_local([shard_master(master, layout, r, 2) for r in range(2)], layout), master)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_padding_is_zero_and_stripped_on_unshard(size: int) -> None:
    master = torch.randn(10, 3)
    layout = ParamLayout((10, 3), normal_init(1.0), partition_dim=0, padded_size=pad_vocab_size(10, 4, size))
    shards = [shard_master(master, layout, r, size) for r in range(size)]
    padded = torch.cat(shards)
    assert padded.shape[0] == pad_vocab_size(10, 4, size)
    assert torch.equal(padded[10:], torch.zeros_like(padded[10:]))
    assert torch.equal(unshard_local(shards, layout), master)


def test_parameter_seed_depends_on_seed_and_name_only() -> None:
    assert parameter_seed(1, "a.weight") == parameter_seed(1, "a.weight")
    assert parameter_seed(1, "a.weight") != parameter_seed(2, "a.weight")
    assert parameter_seed(1, "a.weight") != parameter_seed(1, "b.weight")


def _single() -> ParallelState:
    return ParallelState.single()


def test_column_and_row_parallel_equal_plain_linear_at_tp1() -> None:
    state = _single()
    column = ColumnParallelLinear(6, 8, state=state, init=normal_init(0.5))
    row = RowParallelLinear(8, 5, state=state, init=normal_init(0.5))
    initialize_parameters(column, 3, None)
    initialize_parameters(row, 3, None)
    torch.nn.init.normal_(column.bias)
    torch.nn.init.normal_(row.bias)
    x = torch.randn(4, 2, 6)
    expected = F.linear(F.linear(x, column.weight, column.bias), row.weight, row.bias)
    torch.testing.assert_close(row(column(x)), expected)


def test_skip_weight_needs_a_weight_at_call_time() -> None:
    layer = ColumnParallelLinear(4, 4, state=_single(), init=normal_init(1.0), bias=False, skip_weight=True)
    with pytest.raises(ValueError, match="skip_weight"):
        layer(torch.randn(1, 1, 4))
    torch.testing.assert_close(layer(torch.ones(1, 1, 4), weight=torch.eye(4)), torch.ones(1, 1, 4))


def test_vocab_embedding_pads_with_zero_rows() -> None:
    embedding = VocabParallelEmbedding(10, 16, 4, state=_single(), init=normal_init(1.0))
    initialize_parameters(embedding, 0, None)
    assert embedding.weight.shape == (16, 4)
    assert torch.equal(embedding.weight[10:], torch.zeros(6, 4))
    ids = torch.tensor([[0, 9, 3]])
    torch.testing.assert_close(embedding(ids), embedding.weight[ids])


def test_cross_entropy_matches_torch_with_ignored_targets() -> None:
    logits = torch.randn(5, 3, 11, requires_grad=True)
    target = torch.randint(0, 11, (5, 3))
    target[0, 0] = target[4, 2] = -100
    loss = vocab_parallel_cross_entropy(logits, target, 11, None)
    expected = F.cross_entropy(logits.reshape(-1, 11), target.reshape(-1), reduction="none").view(5, 3)
    torch.testing.assert_close(loss, expected)
    weights = torch.rand(5, 3)
    (loss * weights).sum().backward()
    reference = logits.detach().clone().requires_grad_()
    expected = F.cross_entropy(reference.reshape(-1, 11), target.reshape(-1), reduction="none").view(5, 3)
    (expected * weights).sum().backward()
    torch.testing.assert_close(logits.grad, reference.grad)


def test_cross_entropy_ignores_padding_columns() -> None:
    """Large logits in padding columns must not change the loss or receive gradient."""
    real = torch.randn(4, 2, 7)
    padded = torch.cat([real, torch.full((4, 2, 9), 50.0)], dim=-1).requires_grad_()
    target = torch.randint(0, 7, (4, 2))
    loss = vocab_parallel_cross_entropy(padded, target, 7, None)
    expected = F.cross_entropy(real.reshape(-1, 7), target.reshape(-1), reduction="none").view(4, 2)
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    assert torch.equal(padded.grad[..., 7:], torch.zeros(4, 2, 9))
