"""RNG state tracking so dropout is right under tensor and sequence parallelism.

Inside a tensor-parallel region each rank holds different data (its heads, its sequence chunk under
SP), so its dropout masks must differ per tp rank; outside, activations are replicated across tp and
their masks must be identical, or the replicas drift apart. The tracker keeps a second generator
state (seeded per tp rank) and `fork()` swaps it in for the code that runs inside the region.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

TENSOR_PARALLEL_RNG = "tensor-parallel"


def _get_device_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_device_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named generator states for one device, swapped in and out of the default generator."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._states: dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        """Create state `name` seeded with `seed`, leaving the default generator untouched."""
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists")
        saved = _get_device_state(self.device)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self._states[name] = _get_device_state(self.device)
        _set_device_state(saved, self.device)

    def reset(self) -> None:
        """Forget every tracked state."""
        self._states.clear()

    def has(self, name: str) -> bool:
        return name in self._states

    def get_states(self) -> dict[str, torch.Tensor]:
        """Copies of every tracked state (for checkpoints and activation recompute)."""
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {name: state.clone() for name, state in states.items()}

    @contextmanager
    def fork(self, name: str = TENSOR_PARALLEL_RNG) -> Iterator[None]:
        """Run the body with state `name` as the default generator, then advance and restore."""
        if name not in self._states:
            raise KeyError(f"RNG state {name!r} was never added; call seed_parallel_rng first")
        outside = _get_device_state(self.device)
        _set_device_state(self._states[name], self.device)
        try:
            yield
        finally:
            self._states[name] = _get_device_state(self.device)
            _set_device_state(outside, self.device)


def seed_parallel_rng(
    seed: int, tracker: RNGStatesTracker, tp_rank: int, pp_rank: int
) -> None:
    """Seed the default generator (same on all tp ranks of a stage) and the tp-region state.

    Pipeline stages get different default seeds because they hold different layers; tp ranks of
    one stage share the default seed and differ only inside the forked tp region.
    """
    stage_seed = seed + 100 * pp_rank
    torch.manual_seed(stage_seed)
    if tracker.device.type == "cuda":
        torch.cuda.manual_seed(stage_seed)
    tracker.reset()
    tracker.add(TENSOR_PARALLEL_RNG, stage_seed + 2718 + tp_rank)
