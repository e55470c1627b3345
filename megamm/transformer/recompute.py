"""Activation recompute that replays dropout exactly.

`torch.utils.checkpoint` restores the default generator before recomputing, but dropout inside a
tensor-parallel region draws from the tracker's forked state, which has moved on by backward time.
The recompute context puts the tracker states back to what they were when the forward ran, so the
recomputed dropout masks equal the original ones, then restores the current states.

Inside a compiled layer (--torch-compile, selective recompute of the attention core) the checkpoint
is traced into the graph and dynamo does not trace a custom `context_fn`; it needs none there,
because --torch-compile refuses dropout, so nothing random is recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from megamm.parallel.random import RNGStatesTracker


def _contexts(tracker: RNGStatesTracker):
    at_forward = tracker.get_states()

    @contextmanager
    def replay() -> Iterator[None]:
        now = tracker.get_states()
        tracker.set_states(at_forward)
        try:
            yield
        finally:
            tracker.set_states(now)

    return nullcontext(), replay()


def recompute(fn: Callable[..., torch.Tensor], tracker: RNGStatesTracker, *args) -> torch.Tensor:
    """Run `fn(*args)` keeping only its inputs; recompute it during backward."""
    if torch.compiler.is_compiling():
        return checkpoint(fn, *args, use_reentrant=False)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: _contexts(tracker))
