"""Fault injection for the reliability tests: inert unless MEGAMM_FAULT_INJECT is set.

    MEGAMM_FAULT_INJECT=KIND:rank:R[:iteration:N][:phase:TEXT][:seconds:S]

KIND is one of

- `stall`: global rank R sleeps forever when it enters a phase whose label contains TEXT (a peer
  that hangs inside a step);
- `slow`: rank R sleeps S seconds each time it enters a matching phase (a straggler);
- `exit`: rank R exits at once with status 1 when it enters a matching phase (a peer that dies);
- `kill`: rank R sends itself SIGKILL when it enters a matching phase (a process the kernel or
  the scheduler ends: no Python cleanup, no exit status of its own).

A fault strikes only on torchrun's first attempt (TORCHELASTIC_RESTART_COUNT unset or 0), so a group
that `torchrun --max-restarts` restarts runs clean and can show that it resumes.

`iteration` restricts the fault to that step (1-based, as in the log lines; default every step);
`phase` defaults to "data loading", the first phase of every step. Phase labels are listed by
what the loop enters (megamm.train, megamm.training.step, megamm.pipeline, megamm.optim).

The fault acts through a hook on the rank's phase record (megamm.parallel.phase), so it strikes
exactly where a real fault would be observed and needs no code in the loop. Without the variable
no hook is registered.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from megamm.parallel.phase import Phase, PhaseRecord

VARIABLE = "MEGAMM_FAULT_INJECT"
KINDS = ("stall", "slow", "exit", "kill")
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    iteration: int | None = None
    phase: str = "data loading"
    seconds: float = 0.0

    def matches(self, phase: Phase) -> bool:
        return (self.iteration is None or phase.iteration == self.iteration) and self.phase in phase.label

    def strike(self) -> None:
        if self.kind == "stall":
            while True:
                time.sleep(3600)
        elif self.kind == "slow":
            time.sleep(self.seconds)
        elif self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            os._exit(1)


def parse_fault(text: str) -> Fault:
    """`KIND:rank:R[:iteration:N][:phase:TEXT][:seconds:S]` -> Fault; ValueError names what is wrong."""
    kind, *rest = text.split(":")
    problem = None
    fields: dict[str, str] = {}
    if kind not in KINDS:
        problem = f"unknown fault kind {kind!r} (known: {', '.join(KINDS)})"
    elif len(rest) % 2:
        problem = "expected KIND followed by key:value pairs"
    else:
        fields = dict(zip(rest[::2], rest[1::2]))
        unknown = sorted(set(fields) - {"rank", "iteration", "phase", "seconds"})
        if unknown:
            problem = f"unknown key(s) {', '.join(unknown)} (known: rank, iteration, phase, seconds)"
        elif "rank" not in fields:
            problem = "rank:R is required"
        elif kind == "slow" and "seconds" not in fields:
            problem = "slow needs seconds:S"
    if problem is None:
        try:
            return Fault(
                kind,
                int(fields["rank"]),
                int(fields["iteration"]) if "iteration" in fields else None,
                fields.get("phase", Fault.phase),
                float(fields.get("seconds", 0.0)),
            )
        except ValueError as error:
            problem = str(error)
    raise ValueError(
        f"{VARIABLE}={text!r}: {problem}; expected KIND:rank:R[:iteration:N][:phase:TEXT][:seconds:S]"
    )


def install_from_environment(record: PhaseRecord, rank: int) -> Fault | None:
    """Register the fault MEGAMM_FAULT_INJECT describes on `record` if it targets `rank` and this is
    torchrun's first attempt."""
    text = os.environ.get(VARIABLE)
    if not text:
        return None
    fault = parse_fault(text)
    if fault.rank != rank or int(os.environ.get(RESTART_COUNT, "0")) > 0:
        return fault

    def hook(phase: Phase) -> None:
        if fault.matches(phase):
            fault.strike()

    record.hooks.append(hook)
    return fault
