"""Sample packing: first-fit decreasing (both backends), packed rows, and the block-causal mask.

The key property: a packed row with restarting positions and the block-causal mask gives every
sample exactly the per-token losses it gets when run alone.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from megamm.data import packing
from megamm.data.packing import (
    block_causal_mask,
    pack_first_fit_decreasing,
    pack_python,
    packed_sequence,
    segment_ids,
)
from megamm.models.language import LanguageModel
from megamm.parallel.params import initialize_parameters
from megamm.parallel.state import ParallelState
from tests.tiny import language_config

# The Python reference always; the C++ one where built (the comparison test below does not skip
# silently: it uses importorskip, so a missing extension shows up as a skip in the report).
BACKENDS = [pytest.param(pack_python, id="python")]
if packing.pack_cpp is not None:
    BACKENDS.append(pytest.param(packing.pack_cpp, id="cpp"))


def naive_ffd(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing by scanning every open bin: obviously right, the oracle for both backends."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        first = next((b for b, r in enumerate(room) if r >= lengths[index]), None)
        if first is None:
            bins.append([])
            room.append(capacity)
            first = len(bins) - 1
        bins[first].append(index)
        room[first] -= lengths[index]
    return bins


@pytest.mark.parametrize("pack", BACKENDS)
@pytest.mark.parametrize(
    ("lengths", "capacity", "expected"),
    [
        # 1(5)->b0 [room 2], 3(5)->b1 [2], 0(3)->b2 [4], 2(2)->b0: the first bin with room.
        ([3, 5, 2, 5], 7, [[1, 2], [3], [0]]),
        ([4, 4, 4, 4], 8, [[0, 1], [2, 3]]),
        # 0(6)->b0 [1], 2(5)->b1 [2], 4(4)->b2 [3], 5(3)->b2 (b0, b1 too small), 3(2)->b1, 1(1)->b0.
        ([6, 1, 5, 2, 4, 3], 7, [[0, 1], [2, 3], [4, 5]]),
        # Ties by index ascending; inside a bin, placement order (1 before 0).
        ([2, 3, 2, 3], 5, [[1, 0], [3, 2]]),
        # 0(7)->b0 [3], 1(6)->b1 [4], 2(4)->b1, 3(3)->b0, 4(2)->b2.
        ([7, 6, 4, 3, 2], 10, [[0, 3], [1, 2], [4]]),
        # Exactly full bins and a zero-length sample (fits anywhere, so in the first bin).
        ([3, 0, 3], 3, [[0, 1], [2]]),
        ([], 4, []),
    ],
)
def test_ffd_hand_worked(pack, lengths: list[int], capacity: int, expected: list[list[int]]) -> None:
    assert pack(lengths, capacity) == expected
    assert pack(np.asarray(lengths, dtype=np.int64), capacity) == expected


@pytest.mark.parametrize("pack", [*BACKENDS, pytest.param(pack_first_fit_decreasing, id="default")])
def test_ffd_covers_every_index_once_within_capacity(pack) -> None:
    rng = random.Random(0)
    for _ in range(200):
        capacity = rng.randint(1, 64)
        lengths = [rng.randint(0, capacity) for _ in range(rng.randint(0, 80))]
        bins = pack(lengths, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(b and sum(lengths[i] for i in b) <= capacity for b in bins)
        assert bins == naive_ffd(lengths, capacity)


def test_cpp_matches_python_exactly() -> None:
    cpp = pytest.importorskip("megamm._packing")
    assert packing.BACKEND == "cpp" and packing.pack_cpp is cpp.pack_first_fit_decreasing
    rng = random.Random(1)
    for trial in range(1000):
        capacity = rng.choice([1, 2, 7, 16, 100, 4096])
        # Few distinct lengths in some trials, so ties are frequent.
        top = rng.choice([capacity, min(capacity, 3)])
        lengths = [rng.randint(0, top) for _ in range(rng.randint(0, 300))]
        expected = pack_python(lengths, capacity)
        assert cpp.pack_first_fit_decreasing(lengths, capacity) == expected, trial
        assert cpp.pack_first_fit_decreasing(np.asarray(lengths, dtype=np.int64), capacity) == expected
    lengths = np.random.default_rng(2).integers(1, 2049, 20_000)
    assert cpp.pack_first_fit_decreasing(lengths, 4096) == pack_python(lengths.tolist(), 4096)


@pytest.mark.parametrize("pack", BACKENDS)
def test_ffd_rejects_bad_input(pack) -> None:
    with pytest.raises(ValueError, match="sample 2 has length 9"):
        pack([1, 8, 9, 3], 8)
    with pytest.raises(ValueError, match="sample 1 has a negative length"):
        pack([1, -1], 8)
    with pytest.raises(ValueError, match="capacity"):
        pack([1], 0)
    with pytest.raises(TypeError):
        pack([1.5, 2], 8)


def test_packed_sequence_fields() -> None:
    samples = [
        {"input_ids": [10, 11, 12], "labels": [10, -100, 12]},
        {"input_ids": [20, 21], "labels": [20, 21]},
    ]
    row = packed_sequence(samples, capacity=8, pad_id=0)
    assert row["input_ids"].tolist() == [10, 11, 12, 20, 21, 0, 0, 0]
    # First token of each sample ignored (never a target alone; would be a cross-sample target).
    assert row["labels"].tolist() == [-100, -100, 12, -100, 21, -100, -100, -100]
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    assert row["cu_seqlens"].dtype == torch.int32
    assert row["cu_seqlens"].tolist() == [0, 3, 5]
    assert row["sample_index"].tolist() == [0, 0, 0, 1, 1, -1, -1, -1]
    full = packed_sequence(samples, capacity=5, pad_id=0)
    assert full["cu_seqlens"].tolist() == [0, 3, 5] and full["sample_index"].tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="capacity 4"):
        packed_sequence(samples, capacity=4, pad_id=0)
    with pytest.raises(ValueError, match="labels"):
        packed_sequence([{"input_ids": [1, 2], "labels": [1]}], capacity=4, pad_id=0)


def test_block_causal_mask_hand_built() -> None:
    # Samples [0, 2) and [2, 5), padding at 5.
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    mask = block_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 6)
    assert mask.dtype == torch.bool and torch.equal(mask, expected)
    assert torch.equal(block_causal_mask([0, 6], 6), torch.ones(6, 6, dtype=torch.bool).tril())
    with pytest.raises(ValueError):
        block_causal_mask([0, 7], 6)


def test_segment_ids_hand_built() -> None:
    """Samples [0, 2) and [2, 5), then two padding positions, each a segment of its own."""
    ids = segment_ids(torch.tensor([0, 2, 5], dtype=torch.int32), 7)
    assert ids.tolist() == [0, 0, 1, 1, 1, 2, 3]
    assert segment_ids([0, 6], 6).tolist() == [0] * 6
    with pytest.raises(ValueError):
        segment_ids([0, 7], 6)


def test_packed_losses_equal_standalone_losses() -> None:
    """Two samples in one padded row give each sample's standalone per-token losses and logits."""
    torch.manual_seed(0)
    model = LanguageModel(language_config(), ParallelState.single(), sequence_parallel=False).eval()
    with torch.no_grad():
        initialize_parameters(model, 1234, None)
    generator = torch.Generator().manual_seed(5)
    samples = []
    for length in (7, 5):
        ids = torch.randint(0, 99, (length,), generator=generator).tolist()
        labels = list(ids)
        labels[1] = -100  # an ignored prompt-like token inside the sample
        samples.append({"input_ids": ids, "labels": labels})
    capacity = 16
    row = packed_sequence(samples, capacity, pad_id=0)

    def run(ids: torch.Tensor, labels: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
        hidden = model.embed(ids[None]).transpose(0, 1).contiguous()  # [s, 1, h]
        return model(hidden, labels=labels[None], return_logits=True, **kwargs)

    mask = block_causal_mask(row["cu_seqlens"], capacity)[None, None]
    with torch.no_grad():
        packed = run(
            row["input_ids"], row["labels"], position_ids=row["position_ids"][None], attention_mask=mask
        )
        plain = run(row["input_ids"], row["labels"])  # no packing-aware inputs: a negative control
        assert torch.isfinite(packed["logits"]).all()
        bounds = row["cu_seqlens"].tolist()
        for number, sample in enumerate(samples):
            start, end = bounds[number], bounds[number + 1]
            alone = run(torch.tensor(sample["input_ids"]), torch.tensor(sample["labels"]))
            assert torch.equal(packed["loss_mask"][0, start:end], alone["loss_mask"][0])
            assert (packed["loss"][0, start:end] - alone["loss"][0]).abs().max() < 1e-5
            assert (packed["logits"][start:end] - alone["logits"]).abs().max() < 1e-5
            if number > 0:  # without the mask and restarting positions, later samples do differ
                assert (plain["loss"][0, start:end] - alone["loss"][0]).abs().max() > 1e-3
        assert not packed["loss_mask"][0, bounds[-1] - 1 :].any()  # no loss on or into padding
        # The O(s) form the training batches carry gives the same result.
        by_ids = run(row["input_ids"], row["labels"], position_ids=row["position_ids"][None],
                     segment_ids=segment_ids(row["cu_seqlens"], capacity)[None])
        assert torch.equal(by_ids["logits"], packed["logits"]) and torch.equal(by_ids["loss"], packed["loss"])
