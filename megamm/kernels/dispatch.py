"""Which fused kernels are enabled: the table of kernels verified on a GPU, and the override.

A kernel runs only when it is enabled (below) and the op's inputs are ones it supports (CUDA
tensors of a supported dtype and shape, checked by each op in `megamm.kernels.ops`); everything
else runs the torch reference. Enabled means:

- `MEGAMM_KERNELS` unset or `auto` (the default): the kernels listed in `VERIFIED`, i.e. whose
  tests/gpu suite passed on a real GPU. No user gets an untested kernel by default.
- `MEGAMM_KERNELS=reference` (or `off`): none; every op runs its torch reference (debugging).
- `MEGAMM_KERNELS=all` (or `on`): every kernel, verified or not (testing and benchmarking them).
- `MEGAMM_KERNELS=rms_norm,rotary`: the verified kernels plus the ones named (opt-in).

`set_mode()` / `kernel_mode()` override the environment from Python (the GPU tests and benchmarks
use them). When a kernel is enabled but the extension cannot be built or loaded, an explicit
request (`all` or a name) raises the build error; the default mode warns once and uses the
references.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

ENV_VAR = "MEGAMM_KERNELS"

KERNELS = ("rms_norm", "layer_norm", "rotary", "swiglu", "gelu", "softmax", "cross_entropy")
"""gelu covers the erf and tanh GELU and quick-GELU, each with an optional bias."""


@dataclass(frozen=True)
class Verification:
    device: str  # e.g. "NVIDIA H100 80GB HBM3, torch 2.11.0+cu130"
    date: str  # ISO date of the passing `pytest tests/gpu` run


# Kernels whose tests/gpu passed on a real GPU, and where. Add an entry only after such a run
# (docs/kernels.md says how); an entry turns the kernel on by default.
VERIFIED: dict[str, Verification] = {}


@dataclass(frozen=True)
class Mode:
    """The resolved setting: `names` enabled, and whether they were asked for explicitly."""

    names: frozenset[str]
    explicit: bool


def parse_mode(spec: str | None) -> Mode:
    """`spec` as in `MEGAMM_KERNELS` (None or "" = auto); raises ValueError for an unknown name."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return Mode(frozenset(VERIFIED), explicit=False)
    if spec in ("reference", "off"):
        return Mode(frozenset(), explicit=True)
    if spec in ("all", "on"):
        return Mode(frozenset(KERNELS), explicit=True)
    names = {name.strip() for name in spec.split(",") if name.strip()}
    unknown = sorted(names - set(KERNELS))
    if unknown:
        raise ValueError(
            f"{ENV_VAR}={spec!r}: unknown kernel(s) {', '.join(unknown)}; expected auto, reference, all "
            f"or a comma-separated list of {', '.join(KERNELS)}"
        )
    return Mode(frozenset(VERIFIED) | frozenset(names), explicit=True)


_override: str | None = None


def current_mode() -> Mode:
    """The mode in force: `set_mode`'s if one is set, else the environment's (read on every call, so
    a changed environment takes effect; parsing is a few string operations)."""
    return parse_mode(_override if _override is not None else os.environ.get(ENV_VAR))


def set_mode(spec: str | None) -> None:
    """Override `MEGAMM_KERNELS` for this process (None: back to the environment). Validated now."""
    global _override
    if spec is not None:
        parse_mode(spec)
    _override = spec


@contextmanager
def kernel_mode(spec: str | None) -> Iterator[None]:
    """`set_mode(spec)` for the duration of a `with` block."""
    previous = _override
    set_mode(spec)
    try:
        yield
    finally:
        set_mode(previous)


def enabled(name: str) -> bool:
    if name not in KERNELS:
        raise KeyError(f"unknown kernel {name!r}")
    return name in current_mode().names


@functools.cache
def _smem_optin(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))


def norm_backward_bytes_fit(device: torch.device, hidden: int, layernorm: bool) -> bool:
    """Whether the norm backward's per-block fp32 column accumulators (`hidden` floats, twice for
    layernorm) fit in the device's shared memory (up to 227 KiB on H100, 163 KiB on A100, 99 KiB on
    other Ampere/Ada GPUs: hidden 16k layernorm needs 128 KiB)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return hidden * 4 * (2 if layernorm else 1) <= _smem_optin(index)
