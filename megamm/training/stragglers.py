"""The spread of step times across ranks, for the log line.

The time compared is a rank's busy time per step (megamm.parallel.phase): data loading and the
step, minus the phases spent blocked on other ranks. Wall time would not do: collectives make every
rank of a synchronous job wait for the slowest one, so all ranks would show the same time, or a
fast rank that waited would look slow.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamm.parallel.state import ParallelState


def gather_step_times(seconds_per_step: float, state: ParallelState) -> list[float]:
    """Every rank's value, indexed by global rank: one small all-gather over the world group.

    Collective: every rank calls it at the same log step.
    """
    if state.world_size == 1:
        return [seconds_per_step]
    mine = torch.tensor([seconds_per_step], dtype=torch.float64, device=state.device)
    parts = [torch.empty_like(mine) for _ in range(state.world_size)]
    dist.all_gather(parts, mine, group=state.world_group)
    return [part.item() for part in parts]


def spread_text(times: list[float], threshold: float) -> str:
    """`step time spread: max 1.92 s (rank 3) / min 1.01 s` when max / min exceeds `threshold`,
    else the empty string."""
    slowest = max(range(len(times)), key=times.__getitem__)
    fastest = min(range(len(times)), key=times.__getitem__)
    high, low = times[slowest], times[fastest]
    if high <= 0 or (low > 0 and high / low <= threshold):
        return ""
    return f"step time spread: max {high:.2f} s (rank {slowest}) / min {low:.2f} s (rank {fastest})"
