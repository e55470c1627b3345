"""What this rank is doing right now: a cheap per-process record of the current phase of the step.

The training loop and the modules that communicate name each phase as they enter it ("forward of
microbatch 2 (model chunk 0) on pipeline stage 1", "data-parallel gradient all-reduce (bucket 0)").
Entering a phase is one object assignment and one clock read, with no device synchronization, so
the labels sit on the hot path. Two readers use the record:

- the stall watchdog (megamm.training.watchdog) fires when one phase outlasts the timeout and
  names it;
- the straggler report reads `busy_seconds()`: time spent outside the phases marked `waiting`
  (blocked on other ranks). In a synchronous job every rank's wall time per step is the slowest
  rank's, so only the time a rank spends not waiting tells which rank is slow.

On CUDA the labels follow the host: kernels and NCCL collectives run asynchronously, so a stalled
collective shows up as the first host phase that blocks on its result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    """One phase; immutable, so a reader in another thread always sees a consistent one."""

    label: str
    context: str  # what the loop is doing: "setup", "iteration 3", "evaluation after iteration 3"
    iteration: int | None  # the 1-based step number the context belongs to (None during setup)
    started: float  # the record's clock (time.monotonic) when the phase was entered
    serial: int  # increases at every phase change, so a reader can tell a phase from its successor
    waiting: bool  # blocked on other ranks: not counted as busy time

    def describe(self) -> str:
        return f"{self.label}, {self.context}"


PhaseHook = Callable[[Phase], None]


class PhaseRecord:
    """The current phase of one process, the busy time so far, and hooks called on every change.

    Only the training (main) thread enters phases; other threads only read `current`.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.current = Phase("startup", "setup", None, clock(), 0, False)
        # Called with each new phase in the entering thread (fault injection uses this); empty
        # unless something registers, so the hot path pays for one loop over nothing.
        self.hooks: list[PhaseHook] = []
        self._busy = 0.0

    def _switch(self, label: str, context: str, iteration: int | None, waiting: bool) -> None:
        now = self.clock()
        previous = self.current
        if not previous.waiting:
            self._busy += now - previous.started
        self.current = Phase(label, context, iteration, now, previous.serial + 1, waiting)
        for hook in self.hooks:
            hook(self.current)

    def enter(self, label: str, waiting: bool = False) -> None:
        """Start phase `label` in the current context."""
        self._switch(label, self.current.context, self.current.iteration, waiting)

    def begin(self, context: str, iteration: int | None, label: str) -> None:
        """Start a new context of the loop (a step, an evaluation, a save) with its first phase."""
        self._switch(label, context, iteration, False)

    def busy_seconds(self) -> float:
        """Seconds spent so far in phases that were not waits for other ranks."""
        current = self.current
        return self._busy + (0.0 if current.waiting else self.clock() - current.started)

    @contextmanager
    def waiting_on_peers(self, label: str) -> Iterator[None]:
        """A blocking exchange with other ranks inside the current phase, which resumes after it."""
        previous = self.current
        self.enter(label, waiting=True)
        try:
            yield
        finally:
            self.enter(previous.label, waiting=previous.waiting)


# This process's record: one training loop per process.
RECORD = PhaseRecord()


def enter_phase(label: str, waiting: bool = False) -> None:
    """Enter phase `label` in this process's record (see `PhaseRecord.enter`)."""
    RECORD.enter(label, waiting)


def waiting_on_peers(label: str):
    """`with waiting_on_peers("..."):` around a blocking exchange (see `PhaseRecord.waiting_on_peers`)."""
    return RECORD.waiting_on_peers(label)
