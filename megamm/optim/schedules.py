"""Learning-rate schedules and the fp16 dynamic loss scaler."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

DecayStyle = Literal["constant", "linear", "cosine"]


@dataclass
class LRSchedule:
    """Linear warmup from 0 to `lr` over `warmup_iters`, then decay to `min_lr` at `decay_iters`.

    `lr(iteration)` gives the rate for the step that produces iteration `iteration + 1`
    (iterations count from 0), so step 0 of a warmup run has a small but non-zero rate.
    """

    lr: float
    min_lr: float = 0.0
    warmup_iters: int = 0
    decay_iters: int = 1
    style: DecayStyle = "cosine"

    def __call__(self, iteration: int) -> float:
        if self.warmup_iters > 0 and iteration < self.warmup_iters:
            return self.lr * (iteration + 1) / self.warmup_iters
        if self.style == "constant":
            return self.lr
        span = max(1, self.decay_iters - self.warmup_iters)
        progress = min(1.0, (iteration - self.warmup_iters) / span)
        if self.style == "linear":
            factor = 1.0 - progress
        elif self.style == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            raise ValueError(f"unknown lr decay style {self.style!r}")
        return self.min_lr + (self.lr - self.min_lr) * factor


class DynamicLossScaler:
    """fp16 loss scaling: halve the scale on overflow, double it after `growth_interval` good steps."""

    def __init__(self, initial_scale: float = 2.0**16, growth_interval: int = 1000,
                 min_scale: float = 1.0, max_scale: float = 2.0**24) -> None:
        self.scale = initial_scale
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.good_steps = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.min_scale, self.scale / 2)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale = min(self.max_scale, self.scale * 2)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
