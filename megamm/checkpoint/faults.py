"""Crash injection for the checkpoint reliability tests: inert unless MEGAMM_CHECKPOINT_FAULT is set.

    MEGAMM_CHECKPOINT_FAULT=POINT[:iteration:N]

The process exits at once with status 1 (`os._exit`: no cleanup, no `finally`, as a kill would
leave things) when a save of iteration N (default: every save) reaches POINT:

- `write`: every shard is written, nothing is published yet (for an asynchronous save this
  happens in the background thread, while training goes on);
- `rename`: the description is written into `iter_N.partial/`, which is not renamed yet;
- `latest`: `iter_N.partial/` is renamed to `iter_N/`, `latest` still names the previous one.

A kill in the middle of writing a shard needs no hook (tests/kill_during_save.py sends SIGKILL).
The style is megamm.training.faults', which acts on the training loop's phases; this module sits
in the checkpoint layer, below training, because the points are inside the checkpoint code.
"""

from __future__ import annotations

import os

VARIABLE = "MEGAMM_CHECKPOINT_FAULT"
POINTS = ("write", "rename", "latest")


def _parse(text: str) -> tuple[str, int | None]:
    """`POINT[:iteration:N]` -> (point, iteration or None); ValueError names what is wrong."""
    point, *rest = text.split(":")
    if point not in POINTS:
        problem = f"unknown point {point!r} (known: {', '.join(POINTS)})"
    elif rest and (len(rest) != 2 or rest[0] != "iteration" or not rest[1].isdigit()):
        problem = "expected POINT or POINT:iteration:N"
    else:
        return point, int(rest[1]) if rest else None
    raise ValueError(f"{VARIABLE}={text!r}: {problem}")


def crash_point(point: str, iteration: int) -> None:
    """Exit with status 1 if MEGAMM_CHECKPOINT_FAULT names `point` (and `iteration`); else nothing."""
    text = os.environ.get(VARIABLE)
    if not text:
        return
    target, at = _parse(text)
    if target == point and at in (None, iteration):
        os._exit(1)
