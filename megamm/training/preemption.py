"""Stopping a run early on purpose: a preemption signal, a wall-time budget, an iteration interval.

SLURM sends SIGTERM before it kills a job (and `sbatch --signal=USR1@120` sends SIGUSR1 earlier);
`StopSignals` turns the first SIGTERM or SIGUSR1 a rank receives into a request, and the loop stops
after the step it is in, saves a checkpoint and exits with `EXIT_STOPPED`.

One rank receiving the signal is enough: `StopCheck.share` puts this rank's request (and whether its
wall time passed `--exit-duration-in-mins`) into one all-reduce (MAX) of a 2-element int tensor over
the world group after every step, so every rank stops after the same step. The tensor lives on the
device and the all-reduce is enqueued before the loop's end-of-step device synchronization, so
reading the result (`StopCheck.reason`) adds no host synchronization on GPUs; with gloo it is one
more tiny collective per step. `--exit-interval` needs no agreement: every rank sees the same
iteration.

SIGTERM and the stall watchdog (megamm.training.watchdog): the watchdog registers faulthandler for
SIGTERM with chaining, on top of this handler. So every SIGTERM still writes the rank's stacks to
its `stacks-rank<R>.txt` first (a rank blocked inside a collective never returns to Python, and the
C-level dump is the only record of where it was), then reaches this handler, which asks for the
graceful stop instead of terminating. A rank that stays stuck is still ended by the watchdog's
timeout; a second SIGTERM terminates the rank at once, as without this handler (exit -15).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

from megamm.parallel.state import ParallelState

# The exit status of a run that stopped before --train-iters after saving a checkpoint (a signal,
# --exit-duration-in-mins or --exit-interval): rerun the same command to continue (docs/training.md).
EXIT_STOPPED = 4
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """While entered, the first SIGTERM or SIGUSR1 sets `received` (the signal's name) instead of
    ending the process; a second SIGTERM ends it with the default action. Enter it before the
    watchdog, so that the watchdog's faulthandler chains to it."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> None:
        for number in SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
            # Restart interrupted system calls: a signal arriving inside a collective must not make
            # the backend's blocking read fail with EINTR; the request is acted on after the step.
            signal.siginterrupt(number, False)

    def __exit__(
        self, error_type: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.received is not None:
            if number == signal.SIGTERM:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
            return
        self.received = name
        print(f"megamm: rank {self.rank} received {name}: stopping after this step and saving a checkpoint",
              file=sys.stderr, flush=True)


class StopCheck:
    """Decides, the same way on every rank, whether the run stops after a step.

    `exit_duration_s`: wall-time budget counted from `started` (time.monotonic()), None for none;
    `exit_interval`: stop after an iteration that is a multiple of it, None for none.
    """

    def __init__(self, signals: StopSignals, exit_duration_s: float | None, exit_interval: int | None,
                 started: float) -> None:
        self.signals = signals
        self.exit_duration_s = exit_duration_s
        self.exit_interval = exit_interval
        self.started = started

    def share(self, state: ParallelState) -> torch.Tensor:
        """Start the agreement: [any rank got a signal, any rank is past the time budget], int32 `[2]`
        on the device, reduced with MAX over the world group."""
        over_time = self.exit_duration_s is not None and time.monotonic() - self.started >= self.exit_duration_s
        flags = torch.tensor([self.signals.received is not None, over_time], dtype=torch.int32, device=state.device)
        if state.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=state.world_group)
        return flags

    def reason(self, flags: torch.Tensor, iteration: int) -> str | None:
        """Why the run stops after `iteration` (1-based, completed), None to continue. `flags` is what
        `share` returned for this step."""
        signalled, over_time = flags.tolist()
        # The same text on every rank: the rank that got the signal names it in its own line.
        if signalled:
            return "a rank received a stop signal (SIGTERM or SIGUSR1)"
        if over_time:
            return "the wall time passed --exit-duration-in-mins"
        if self.exit_interval is not None and iteration % self.exit_interval == 0:
            return f"--exit-interval {self.exit_interval}"
        return None
