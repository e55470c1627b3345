"""The training data loader: deterministic, sharded over data-parallel ranks, resumable, with workers.

Positions, not iterators. Global sample position p (0, 1, 2, ...) is read from record
`order(p)`: epoch e = p // N uses a permutation of the N records seeded by (seed, e). A global batch
trains on the next G positions (G = global batch size) after the samples consumed so far, [c, c + G),
and data-parallel rank r of D takes the contiguous slice [c + r * G / D, c + (r + 1) * G / D). A run
that started at iteration 0 has consumed c = k * G before iteration k; a run resumed from a
checkpoint continues from its `train/consumed_samples` (`ResumePoint`), so it reads exactly what
the uninterrupted run would have, also when it resumes with another global batch size. So what any
rank reads at any step is a pure function of (seed, consumed samples, rank), nothing is carried
from step to step. Within an epoch no record is read twice across all ranks.

Balanced split. With a `Balancer` (--balance-vision-work, megamm.data.balance) the positions
[c, c + G) of a global batch are spread over ranks and microbatches by their probed cost instead of
in contiguous slices; the plan is again a pure function of the positions, so the properties above
hold unchanged.

Bad samples. A position whose record is bad (`BadSample`) is filled by a replacement drawn from a
generator seeded by (seed, position, attempt), again a pure function of the position, so every pipeline
stage and tensor-parallel rank that reads a position picks the same replacement, and a resumed run
picks the same as an uninterrupted one. The bad record is reported back with the sample and counted by
`LoaderStats`; when more than `max_bad_fraction` of the records read are bad the loader raises, since
then the dataset or its configuration (a wrong --image-folder, a wrong template) is broken.

Workers. `torch.utils.data.DataLoader` worker processes decode images and tokenize; results come back
in position order, so the worker count changes speed, never content.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from megamm.data.balance import Balancer, BatchPlan
from megamm.data.native_samples import NativeSampleBuilder
from megamm.data.samples import Sample, SampleBuilder, SampleLayout
from megamm.data.sources import BadSample, Record, RecordSource

_LOGGER = logging.getLogger(__name__)
# Replacement draws for one bad position before giving up (only reachable when nearly all are bad).
MAX_REPLACEMENT_ATTEMPTS = 64
# Every BadSample kind the readers and the sample builder raise; counts are kept for each (ranks add
# them up in a fixed order).
BAD_KINDS = ("json", "schema", "placeholders", "member", "image", "video", "all_masked", "too_long")
T = TypeVar("T")
# Stream ids that keep the epoch permutations and the replacement draws independent.
_ORDER_STREAM, _REPLACEMENT_STREAM = 0, 1


class SampleOrder:
    """Global sample position -> record index: a fresh seeded permutation of the records per epoch."""

    def __init__(self, num_records: int, seed: int) -> None:
        if num_records < 1:
            raise ValueError("the dataset has no samples")
        self.num_records = num_records
        self.seed = seed
        self._epoch: tuple[int, np.ndarray] | None = None

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_records)
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, _ORDER_STREAM, epoch])
            self._epoch = (epoch, rng.permutation(self.num_records))
        return int(self._epoch[1][offset])

    def replacement(self, position: int, attempt: int) -> int:
        """The record tried instead at `position` after `attempt` + 1 bad ones."""
        rng = np.random.default_rng([self.seed, _REPLACEMENT_STREAM, position, attempt])
        return int(rng.integers(self.num_records))


@dataclass
class Fetched:
    """What reading one position gave: the sample and the bad records met on the way (kind, message)."""

    position: int
    sample: Sample
    bad: list[tuple[str, str]] = field(default_factory=list)


class PositionDataset(Dataset):
    """`dataset[position]` -> Fetched, replacing bad records deterministically (see the module docstring)."""

    def __init__(self, source: RecordSource, builder: SampleBuilder | NativeSampleBuilder, seed: int) -> None:
        self.source = source
        self.builder = builder
        self.order = SampleOrder(len(source), seed)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, position: int) -> Fetched:
        sample, bad = self._first_good(position, self.builder.build)
        return Fetched(position, sample, bad)

    def probe(self, position: int) -> SampleLayout:
        """The counts of the sample at `position` without decoding its images (`SampleBuilder.probe`),
        following the same replacements for bad records."""
        return self._first_good(position, self.builder.probe)[0]

    def _first_good(self, position: int, read: Callable[[Record], T]) -> tuple[T, list[tuple[str, str]]]:
        """`read` of the record at `position`, or of its replacements while records are bad; and the
        bad ones met (kind, message)."""
        bad: list[tuple[str, str]] = []
        index = self.order(position)
        for attempt in range(MAX_REPLACEMENT_ATTEMPTS + 1):
            try:
                return read(self.source[index]), bad
            except BadSample as error:
                bad.append((error.kind, str(error)))
            index = self.order.replacement(position, attempt)
        raise RuntimeError(
            f"position {position}: {len(bad)} records in a row were bad, e.g. {bad[-1][1]}; the dataset "
            "or its configuration (--image-folder, --chat-template, --seq-length) looks broken"
        )


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: its first iteration and the samples consumed before it (the checkpoint's
    `train/iteration` and `train/consumed_samples`; both 0 for a fresh run)."""

    iteration: int = 0
    consumed_samples: int = 0

    def first_position(self, iteration: int, global_batch: int) -> int:
        """The global position of the first sample of `iteration` (>= self.iteration): every
        iteration since the resume consumed `global_batch` samples."""
        return self.consumed_samples + (iteration - self.iteration) * global_batch


class _Positions(Sampler[int]):
    """This rank's positions for iterations [resume.iteration, stop), in order."""

    def __init__(self, resume: ResumePoint, stop: int, global_batch: int, dp_rank: int, dp_size: int) -> None:
        self.resume, self.stop = resume, stop
        self.global_batch = global_batch
        self.per_rank = global_batch // dp_size
        self.offset = dp_rank * self.per_rank

    def __iter__(self) -> Iterator[int]:
        for iteration in range(self.resume.iteration, self.stop):
            base = self.resume.first_position(iteration, self.global_batch) + self.offset
            yield from range(base, base + self.per_rank)

    def __len__(self) -> int:
        return (self.stop - self.resume.iteration) * self.per_rank


class _BalancedPositions(Sampler[int]):
    """This rank's positions for iterations [resume.iteration, stop) as `balancer` assigns each
    global batch (megamm.data.balance), microbatch by microbatch; keeps each iteration's plan in
    `plans` until the loader takes it."""

    def __init__(self, resume: ResumePoint, stop: int, global_batch: int, dp_rank: int, dp_size: int,
                 balancer: Balancer, probe: Callable[[int], SampleLayout]) -> None:
        self.resume, self.stop = resume, stop
        self.global_batch, self.dp_rank, self.dp_size = global_batch, dp_rank, dp_size
        self.balancer, self.probe = balancer, probe
        self.plans: dict[int, BatchPlan] = {}

    def __iter__(self) -> Iterator[int]:
        for iteration in range(self.resume.iteration, self.stop):
            first = self.resume.first_position(iteration, self.global_batch)
            plan = self.balancer.plan(first, self.global_batch, self.dp_size, self.probe)
            self.plans[iteration] = plan
            for microbatch in plan.positions[self.dp_rank]:
                yield from microbatch

    def __len__(self) -> int:
        return (self.stop - self.resume.iteration) * (self.global_batch // self.dp_size)


def _sampler(resume: ResumePoint, stop: int, global_batch: int, dp_rank: int, dp_size: int,
             balance: tuple[Balancer, Callable[[int], SampleLayout]] | None) -> _Positions | _BalancedPositions:
    if balance is None:
        return _Positions(resume, stop, global_batch, dp_rank, dp_size)
    return _BalancedPositions(resume, stop, global_batch, dp_rank, dp_size, *balance)


def rank_positions(iteration: int, global_batch: int, dp_rank: int, dp_size: int,
                   resume: ResumePoint | None = None,
                   balance: tuple[Balancer, Callable[[int], SampleLayout]] | None = None) -> list[int]:
    """The global positions data-parallel rank `dp_rank` trains on at `iteration` of a run that
    started at `resume` (default: a fresh run); with `balance` (the balancer and the probe of a
    position's sample), as --balance-vision-work assigns them, microbatch by microbatch."""
    resume = resume or ResumePoint()
    here = ResumePoint(iteration, resume.first_position(iteration, global_batch))
    return list(_sampler(here, iteration + 1, global_batch, dp_rank, dp_size, balance))


@dataclass
class LoaderStats:
    """Records read and bad ones (by kind) on this rank; `check` enforces the bad-fraction limit."""

    records: int = 0
    bad: int = 0
    reasons: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_KINDS, 0))

    def add(self, fetched: Fetched) -> None:
        self.records += 1 + len(fetched.bad)
        self.bad += len(fetched.bad)
        for kind, _ in fetched.bad:
            if kind not in self.reasons:
                raise ValueError(f"unknown bad-sample kind {kind!r}; add it to BAD_KINDS")
            self.reasons[kind] += 1

    def check(self, max_bad_fraction: float, min_records: int) -> None:
        if self.records >= min_records and self.bad > max_bad_fraction * self.records:
            raise RuntimeError(
                f"most samples are bad: {self.bad} of {self.records} records read were skipped "
                f"(more than --max-bad-sample-fraction {max_bad_fraction}); by reason: "
                f"{ {k: v for k, v in self.reasons.items() if v} }. "
                "Check --data-path, --image-folder and --chat-template"
            )


class RankLoader:
    """Iterates this rank's samples, one list of G / D samples per iteration, from `start`
    (an iteration: a run that started at 0 with this G; or a `ResumePoint`) to `stop_iteration`.

    `num_workers` > 0 reads ahead in worker processes (about two iterations' worth).
    """

    def __init__(
        self,
        dataset: PositionDataset,
        global_batch: int,
        dp_rank: int,
        dp_size: int,
        start: int | ResumePoint,
        stop_iteration: int,
        num_workers: int = 0,
        max_bad_fraction: float = 0.5,
        min_records_for_check: int = 100,
        log: Callable[[str], None] | None = None,
        balancer: Balancer | None = None,
    ) -> None:
        if global_batch % dp_size:
            raise ValueError(f"global batch {global_batch} is not a multiple of the data-parallel size {dp_size}")
        self.per_rank = global_batch // dp_size
        self.max_bad_fraction = max_bad_fraction
        self.min_records_for_check = min_records_for_check
        self.log = log if log is not None else _LOGGER.warning
        self.stats = LoaderStats()
        resume = start if isinstance(start, ResumePoint) else ResumePoint(start, start * global_batch)
        self.iteration = resume.iteration
        balance = (balancer, dataset.probe) if balancer is not None else None
        self._sampler = _sampler(resume, stop_iteration, global_batch, dp_rank, dp_size, balance)
        # The plan of the iteration `__next__` returned last (None without a balancer).
        self.plan: BatchPlan | None = None
        extra = {}
        if num_workers > 0:
            extra = {
                "prefetch_factor": max(2, math.ceil(2 * self.per_rank / num_workers)),
                "multiprocessing_context": "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None,
            }
        self._items = iter(
            DataLoader(dataset, batch_size=None, sampler=self._sampler, num_workers=num_workers, collate_fn=_identity, **extra)
        )

    def __iter__(self) -> RankLoader:
        return self

    def __next__(self) -> list[Sample]:
        samples = []
        for _ in range(self.per_rank):
            fetched: Fetched = next(self._items)
            self.stats.add(fetched)
            for kind, message in fetched.bad:
                self.log(f"skipping bad sample ({kind}): {message}")
            samples.append(fetched.sample)
        self.stats.check(self.max_bad_fraction, self.min_records_for_check)
        if isinstance(self._sampler, _BalancedPositions):
            # The sampler runs in this process (workers only read), ahead of the samples it ordered.
            self.plan = self._sampler.plans.pop(self.iteration)
        self.iteration += 1
        return samples


def _identity(item: Fetched) -> Fetched:
    return item
