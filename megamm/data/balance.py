"""Balanced vision work across data-parallel ranks (--balance-vision-work).

With dynamic tiling (or native-resolution images) the vision-tower inputs of one sample range from 0
to 13 tiles or more, so the contiguous split of a global batch (rank r takes positions
[c + r G/D, c + (r + 1) G/D), megamm.data.loader) can hand one rank several times the vision work of
another, and every rank waits for it at the gradient sync. Instead, the G positions of each global
batch are assigned to (rank, microbatch) slots by their estimated cost:

1. every rank probes the cost of all G positions (`SampleLayout`: image headers and the rendered
   token count, no pixel decoding; megamm.data.samples.SampleBuilder.probe for tiles,
   megamm.data.native_samples.NativeSampleBuilder.probe for native-resolution images and videos:
   each one's (t, h, w) grid from its header, a video's from its container header or first frame),
2. longest processing time first: positions in decreasing cost go to the least-loaded rank that
   still has room, each rank taking exactly G/D (every rank must run the same number of
   microbatches), then the same within each rank over its microbatches of `micro_batch_size`.

The assignment is a pure function of the costs of positions [c, c + G), which are a pure function
of (seed, position), so every rank computes the same one without communication, a resumed run
(`ResumePoint`: consumed samples) the same as the uninterrupted one, and each position is read by
exactly one rank, exactly once. Ties break by position and by rank, so nothing depends on sort
stability or floating-point order beyond the costs themselves.

Costs, not decoded samples, because the assignment has to exist before anyone decodes: decoding the
whole global batch on every rank to measure it would multiply the image work by D. A probe reads
the record and the image header (and tokenizes); for a record whose image only fails while
decoding, the probe's cost is the bad record's, so that one slot is estimated from the wrong sample
(the loader replaces it as always; nothing is lost or repeated). Costs are weighed by
`SampleCost -> float` callables (megamm.training.metrics.sample_flops: the model's FLOPs, attention
quadratic in each tower sequence); the cost takes vision-token counts per tower input and the
text-token count, and for native-resolution inputs their grids (attention runs per frame, or per
window in Qwen2.5-VL's windowed layers).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megamm.data.samples import SampleLayout

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class SampleCost:
    """What a sample costs: the tower tokens of each vision-tower input (a tile, or a native-
    resolution image or video) and its language-model tokens (image tokens included).

    grids: the (t, h, w) patch grid of each native-resolution input (empty for tiles), which the
    FLOP count needs beyond the token counts (attention runs per frame, or per window).
    """

    vision: tuple[int, ...]
    text: int
    grids: tuple[Grid, ...] = ()

    @property
    def vision_tokens(self) -> int:
        return sum(self.vision)


Weigh = Callable[[SampleCost], float]


def sample_cost(layout: SampleLayout, tower_tokens: int | None) -> SampleCost:
    """The cost of a probed sample. Tiled (a fixed-size tower): every tower input is one sequence of
    `tower_tokens` (the tower's patches plus class token). Native-resolution (`layout.grids`, the
    tower given as `tower_tokens=None`): each image and video is one sequence of its t * h * w
    patches."""
    if tower_tokens is None:
        return SampleCost(tuple(t * h * w for t, h, w in layout.grids), layout.tokens, layout.grids)
    if layout.grids:
        raise ValueError(f"a native-resolution sample (grids {layout.grids}) weighed as tiles of {tower_tokens} "
                         "tokens; a native-resolution tower's balancer has tower_tokens=None")
    return SampleCost((tower_tokens,) * sum(layout.tiles_per_image), layout.tokens)


def longest_first(weights: Sequence[float], bins: int, capacity: int) -> list[list[int]]:
    """Indices of `weights` into `bins` bins of exactly `capacity` each (len(weights) == bins *
    capacity): heaviest first, each to the lightest bin with room (the lowest-numbered on a tie).
    Returns each bin's indices in increasing order."""
    if len(weights) != bins * capacity:
        raise ValueError(f"{len(weights)} items do not fill {bins} bins of {capacity}")
    # A heap of (load, bin) over the bins with room: O(n log bins) per global batch.
    open_bins = [(0.0, b) for b in range(bins)]
    members: list[list[int]] = [[] for _ in range(bins)]
    for index in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, target = heapq.heappop(open_bins)
        members[target].append(index)
        if len(members[target]) < capacity:
            heapq.heappush(open_bins, (load + weights[index], target))
    return [sorted(m) for m in members]


def balanced_split(weights: Sequence[float], dp_size: int, micro_batch_size: int) -> list[list[list[int]]]:
    """`[rank][microbatch]` -> indices into the global batch: ranks balanced first, then each rank's
    microbatches (module docstring)."""
    per_rank = len(weights) // dp_size
    split = []
    for members in longest_first(weights, dp_size, per_rank):
        inner = longest_first([weights[i] for i in members], per_rank // micro_batch_size, micro_batch_size)
        split.append([[members[i] for i in microbatch] for microbatch in inner])
    return split


def contiguous_split(count: int, dp_size: int, micro_batch_size: int) -> list[list[list[int]]]:
    """The plain split megamm.data.loader uses: rank r takes the r-th contiguous 1/D, microbatches in order."""
    per_rank = count // dp_size
    return [[list(range(start, start + micro_batch_size)) for start in range(r * per_rank, (r + 1) * per_rank,
                                                                              micro_batch_size)]
            for r in range(dp_size)]


@dataclass(frozen=True)
class Imbalance:
    """max / mean over data-parallel ranks of the vision tokens and the text tokens (1.0: even)."""

    vision: float
    text: float

    @classmethod
    def of(cls, costs: Sequence[SampleCost], split: list[list[list[int]]]) -> Imbalance:
        def ratio(per_rank: list[int]) -> float:
            mean = sum(per_rank) / len(per_rank)
            return max(per_rank) / mean if mean else 1.0

        ranks = [[i for microbatch in rank for i in microbatch] for rank in split]
        return cls(ratio([sum(costs[i].vision_tokens for i in r) for r in ranks]),
                   ratio([sum(costs[i].text for i in r) for r in ranks]))


@dataclass(frozen=True)
class BatchPlan:
    """One global batch's assignment: `positions[rank][microbatch]` are global sample positions;
    the imbalance of this split, and of the contiguous split it replaces."""

    positions: list[list[list[int]]]
    imbalance: Imbalance
    contiguous: Imbalance


@dataclass(frozen=True)
class Balancer:
    """How the loader spreads a global batch: microbatch size, the tower's tokens per input (None for a
    native-resolution tower, whose inputs are as long as their grids) and the weighing of a cost."""

    micro_batch_size: int
    tower_tokens: int | None
    weigh: Weigh

    def plan(self, first_position: int, global_batch: int, dp_size: int,
             probe: Callable[[int], SampleLayout]) -> BatchPlan:
        """The plan of the global batch at positions [first_position, first_position + global_batch)."""
        costs = [sample_cost(probe(first_position + i), self.tower_tokens) for i in range(global_batch)]
        split = balanced_split([self.weigh(c) for c in costs], dp_size, self.micro_batch_size)
        positions = [[[first_position + i for i in mb] for mb in rank] for rank in split]
        return BatchPlan(positions, Imbalance.of(costs, split),
                         Imbalance.of(costs, contiguous_split(global_batch, dp_size, self.micro_batch_size)))


def interval_imbalance(plans: Sequence[BatchPlan]) -> tuple[Imbalance, Imbalance]:
    """The mean over `plans` (the steps of one log interval) of the balanced and the contiguous
    imbalance."""
    def mean(values: list[Imbalance]) -> Imbalance:
        return Imbalance(sum(v.vision for v in values) / len(values), sum(v.text for v in values) / len(values))

    return mean([p.imbalance for p in plans]), mean([p.contiguous for p in plans])
