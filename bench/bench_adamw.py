"""The AdamW update alone: torch's three implementations on the parameters of bench_train_step.py's model.

    python bench/bench_adamw.py [--config default|large] [--steps 10] [--rounds 3]

Why: megamm's optimizer (`megamm.optim.optimizer`) runs `torch.optim.AdamW(fused=True)` over its fp32
masters. This script shows what that choice is worth against the other two implementations torch
offers: the per-tensor loop (the CPU default: about ten element-wise passes per parameter) and
`foreach` (the same passes batched over tensors). The parameters are the trainable ones of
`bench_train_step.py`'s megamm model in the chosen configuration (built there, so the shapes are the
model's own), each with a random gradient; lr 1e-4, betas (0.9, 0.999), no weight decay, as in that
benchmark. One untimed step creates the moments, then `--steps` steps are timed per implementation,
the implementations alternating in each of `--rounds` rounds so that drifts in machine speed hit them
all. Printed: the median time per step of each and its ratio to the loop (above 1: faster), and the
largest difference of the updated weights from the loop's (the three compute the same update up to
rounding).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import CONFIGS, build_megamm

IMPLEMENTATIONS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def parameter_shapes(config: str) -> list[torch.Size]:
    """Shapes of the trainable parameters of bench_train_step.py's megamm model."""
    trainer = build_megamm(CONFIGS[config], total_steps=1, seed=0, torch_compile=False)
    return [p.shape for chunk in trainer.chunks for p in chunk.parameters() if p.requires_grad]


def make_optimizer(shapes: list[torch.Size], options: dict) -> tuple[torch.optim.AdamW, list[torch.Tensor]]:
    """Parameters with fixed random weights and gradients (the same for every implementation)."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        param = torch.randn(shape, generator=generator).requires_grad_()
        param.grad = torch.randn(shape, generator=generator)
        params.append(param)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **options)
    optimizer.step()  # creates the moments; not timed
    return optimizer, params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    shapes = parameter_shapes(args.config)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), config {args.config}: "
          f"{len(shapes)} tensors, {sum(s.numel() for s in shapes):,} parameters")
    built = {name: make_optimizer(shapes, options) for name, options in IMPLEMENTATIONS.items()}
    times: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    for _ in range(args.rounds):
        for name, (optimizer, _) in built.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                optimizer.step()
                times[name].append(time.perf_counter() - start)
    loop = statistics.median(times["loop"])
    reference = built["loop"][1]
    print(f"{'implementation':<16}{'median ms':>10}{'min ms':>9}{'vs loop':>9}{'max |w - w_loop|':>19}")
    for name, (_, params) in built.items():
        median = statistics.median(times[name])
        drift = max((p - r).abs().max().item() for p, r in zip(params, reference))
        print(f"{name:<16}{median * 1e3:>10.1f}{min(times[name]) * 1e3:>9.1f}{loop / median:>9.2f}{drift:>19.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
