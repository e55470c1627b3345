"""--balance-vision-work: the longest-first assignment (every sample exactly once, equal microbatch
counts, deterministic, less imbalance than the contiguous split on a skewed batch), the probe that
weighs samples without decoding (the counts the built sample has), and the balanced loader (each
global batch covered once over the ranks, a resumed run assigns the same)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from megamm.data.balance import (
    Balancer,
    BatchPlan,
    Imbalance,
    SampleCost,
    balanced_split,
    contiguous_split,
    interval_imbalance,
    longest_first,
    sample_cost,
)
from megamm.data.datasets import open_source
from megamm.data.images import choose_grid, tile_count, tile_image
from megamm.data.loader import PositionDataset, RankLoader, ResumePoint, rank_positions
from megamm.data.samples import ImageSettings, SampleBuilder
from megamm.data.tokenizer import load_tokenizer
from tests.data_fixtures import DatasetFiles, write_dataset

TILE = 16
TOWER_TOKENS = 17  # 16 patches + class token
SEQ = 128


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> DatasetFiles:
    return write_dataset(tmp_path_factory.mktemp("balance"), rows=24)


def _dataset(files: DatasetFiles, max_tiles: int = 4) -> PositionDataset:
    builder = SampleBuilder(load_tokenizer(files.tokenizer), "plain", ImageSettings(TILE, max_tiles=max_tiles), 16, SEQ)
    return PositionDataset(open_source(str(files.train), str(files.images)), builder, seed=3)


def _by_vision(cost: SampleCost) -> float:
    return cost.vision_tokens + 1e-3 * cost.text


BALANCER = Balancer(micro_batch_size=2, tower_tokens=TOWER_TOKENS, weigh=_by_vision)


def _skewed(count: int, seed: int = 0) -> list[float]:
    """Mostly small weights with a few 10-20x heavier ones, heavy ones bunched at the start (what a
    contiguous split handles worst)."""
    rng = random.Random(seed)
    heavy = [rng.uniform(10, 20) for _ in range(count // 4)]
    return heavy + [rng.uniform(0.5, 1.5) for _ in range(count - len(heavy))]


def _loads(weights: list[float], split: list[list[list[int]]]) -> list[float]:
    return [sum(weights[i] for mb in rank for i in mb) for rank in split]


def test_each_sample_lands_once_in_equal_microbatches_and_the_load_evens_out() -> None:
    weights = _skewed(48)
    split = balanced_split(weights, dp_size=4, micro_batch_size=3)
    assert split == balanced_split(list(weights), 4, 3)  # deterministic
    assert sorted(i for rank in split for mb in rank for i in mb) == list(range(48))
    assert [[len(mb) for mb in rank] for rank in split] == [[3] * 4] * 4
    balanced, contiguous = _loads(weights, split), _loads(weights, contiguous_split(48, 4, 3))
    assert max(balanced) / min(balanced) < 1.05
    assert max(contiguous) / min(contiguous) > 3
    # Within a rank the microbatches are balanced too: the heaviest 4 samples of any rank go to 4 microbatches.
    for rank in split:
        heaviest = sorted((i for mb in rank for i in mb), key=lambda i: -weights[i])[:4]
        assert sorted(next(m for m, mb in enumerate(rank) if i in mb) for i in heaviest) == [0, 1, 2, 3]


def test_longest_first_refuses_a_batch_that_does_not_fill_the_bins() -> None:
    with pytest.raises(ValueError, match="7 items do not fill 2 bins of 4"):
        longest_first([1.0] * 7, 2, 4)


def test_imbalance_is_max_over_mean_per_rank() -> None:
    costs = [SampleCost((17,) * 3, 10), SampleCost((), 30), SampleCost((17,), 20), SampleCost((), 20)]
    assert Imbalance.of(costs, [[[0, 1]], [[2, 3]]]) == Imbalance(3 * 17 / (2 * 17), 1.0)
    assert Imbalance.of([SampleCost((), 0)] * 2, [[[0]], [[1]]]) == Imbalance(1.0, 1.0)
    # The log line's figures: means over the interval's steps, of the balanced and the contiguous split.
    plans = [BatchPlan([], Imbalance(1.2, 1.0), Imbalance(2.0, 1.5)), BatchPlan([], Imbalance(1.0, 1.1), Imbalance(1.0, 1.0))]
    assert interval_imbalance(plans) == (Imbalance(1.1, 1.05), Imbalance(1.5, 1.25))


# (size, tiles with a thumbnail): 1x1; 2x1 + thumbnail; 1x3 + thumbnail; 5x1 + thumbnail; 1x2 + thumbnail.
@pytest.mark.parametrize(("size", "tiles"), [((16, 16), 1), ((24, 12), 3), ((12, 30), 4), ((100, 20), 6),
                                             ((33, 65), 3)])
def test_tile_count_is_what_the_tiling_cuts(size: tuple[int, int], tiles: int) -> None:
    image, grid = Image.new("RGB", size), choose_grid(*size, 6, tile_size=TILE)
    assert tile_count(grid, thumbnail=True) == len(tile_image(image, TILE, 6)) == tiles
    assert tile_count(grid, thumbnail=False) == len(tile_image(image, TILE, 6, False)) == max(tiles - 1, 1)


@pytest.mark.parametrize("max_tiles", [1, 4])
def test_the_probe_gives_the_built_samples_counts(clean: DatasetFiles, max_tiles: int) -> None:
    dataset = _dataset(clean, max_tiles)
    tiles = set()
    for position in range(len(dataset)):
        sample = dataset[position].sample
        layout = dataset.probe(position)
        assert layout.tiles_per_image == tuple(sample.tiles_per_image), position
        assert layout.tokens == len(sample), position
        tiles.add(sum(sample.tiles_per_image))
    assert tiles == ({0, 1} if max_tiles == 1 else {0, 1, 3, 4})  # text-only rows and 3 image shapes


def test_balanced_positions_cover_each_global_batch_once_and_resume_alike(clean: DatasetFiles) -> None:
    dataset = _dataset(clean)
    balance = (BALANCER, dataset.probe)
    fresh = {(it, r): rank_positions(it, 8, r, 2, balance=balance) for it in range(3) for r in range(2)}
    moved = False
    for it in range(3):
        both = fresh[it, 0] + fresh[it, 1]
        assert sorted(both) == list(range(8 * it, 8 * it + 8))
        moved |= fresh[it, 0] != rank_positions(it, 8, 0, 2)
    assert moved, "the balancer never changed the contiguous split: the test data is not skewed"
    # Resumed from a checkpoint of iteration 1, or of a run with another global batch size that
    # consumed the same 8 samples in 2 steps: the same assignment of positions [8, 16).
    for resume in (ResumePoint(1, 8), ResumePoint(2, 8)):
        for r in range(2):
            assert rank_positions(resume.iteration, 8, r, 2, resume, balance) == fresh[1, r]


def test_the_balanced_loader_reads_its_plan_and_evens_vision_tokens(clean: DatasetFiles) -> None:
    dataset = _dataset(clean)
    read, plans = [], []
    for rank, workers in ((0, 0), (1, 1)):
        loader = RankLoader(dataset, 8, rank, 2, 0, 3, num_workers=workers, balancer=BALANCER)
        steps = []
        for samples in loader:
            steps.append([s.sample_id for s in samples])
            plans.append(loader.plan)
        read.append(steps)
    for it in range(3):
        for rank in range(2):
            expected = [dataset[p].sample.sample_id for mb in plans[it].positions[rank] for p in mb]
            assert read[rank][it] == expected
        assert plans[it] == plans[3 + it]  # both ranks computed the same plan
    costs_per_step = [[sample_cost(dataset.probe(p), TOWER_TOKENS) for p in range(8 * it, 8 * it + 8)]
                      for it in range(3)]
    for it, plan in enumerate(plans[:3]):
        split = [[[p - 8 * it for p in mb] for mb in rank] for rank in plan.positions]
        assert plan.imbalance == Imbalance.of(costs_per_step[it], split)
        assert plan.contiguous == Imbalance.of(costs_per_step[it], contiguous_split(8, 2, 2))
    assert sum(p.imbalance.vision for p in plans[:3]) < sum(p.contiguous.vision for p in plans[:3])


def test_native_resolution_samples_are_weighed_by_their_grids(tmp_path: Path) -> None:
    """A native-resolution dataset (images of several sizes, a frame-list video): the balancer weighs
    each sample by its probed grids, every global batch is covered once and a resumed run assigns
    the same; the loader's samples are those of its plan."""
    from megamm.data.native_samples import NativeSampleBuilder
    from tests.data.test_native_samples import FRAMES, SETTINGS, json_rows, qwen_tokenizer, write_native_files

    root = write_native_files(tmp_path)
    for name, side in (("big", 200), ("small", 20)):
        Image.new("RGB", (side, side)).save(root / f"{name}.png")
    turns = [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "A cat."}]
    rows = [{"id": str(i), "image": ("big.png", "small.png", "image0.png", "small.png")[i % 4], "conversations": turns}
            for i in range(12)]
    rows += [{"id": "v", "video": FRAMES, "frame_rate": 4,
              "conversations": [{"from": "human", "value": "<video>What?"}, turns[1]]}]
    builder = NativeSampleBuilder(qwen_tokenizer(root), "qwen2_vl", SETTINGS, 512)
    dataset = PositionDataset(json_rows(root, rows), builder, seed=1)
    balancer = Balancer(micro_batch_size=2, tower_tokens=None, weigh=_by_vision)
    balance = (balancer, dataset.probe)
    plans = [balancer.plan(8 * it, 8, 2, dataset.probe) for it in range(3)]
    for it, plan in enumerate(plans):
        ranks = [rank_positions(it, 8, r, 2, balance=balance) for r in range(2)]
        assert sorted(ranks[0] + ranks[1]) == list(range(8 * it, 8 * it + 8))
        assert ranks == [[p for mb in rank for p in mb] for rank in plan.positions]
        costs = [sample_cost(dataset.probe(p), None) for p in range(8 * it, 8 * it + 8)]
        assert all(cost.grids and cost.vision == tuple(t * h * w for t, h, w in cost.grids) for cost in costs)
        assert plan.imbalance == Imbalance.of(costs, [[[p - 8 * it for p in mb] for mb in r] for r in plan.positions])
    assert sum(p.imbalance.vision for p in plans) < sum(p.contiguous.vision for p in plans)
    assert rank_positions(1, 8, 1, 2, ResumePoint(1, 8), balance) == [p for mb in plans[1].positions[1] for p in mb]
    assert any(cost.grids[0][0] > 1 for p in range(24) for cost in [sample_cost(dataset.probe(p), None)])  # the video
    loader = RankLoader(dataset, 8, 1, 2, 0, 1, balancer=balancer)
    assert [s.sample_id for s in next(loader)] == [dataset[p].sample.sample_id for mb in plans[0].positions[1] for p in mb]
    assert loader.plan == plans[0]
