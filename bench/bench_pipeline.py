"""Time per training step for pipeline sizes 1, 2 and 4 (4 also with virtual stages), same model and
global batch, on CPU processes launched with torchrun.

    python bench/bench_pipeline.py [--iters 12] [--layers 8] [--global-batch 16]

Each configuration is a real `megamm.train` run of examples/tiny_cpu.yaml with a deeper language
model; the figure is the mean "elapsed time per iteration" over the steps after the first log
interval (the first steps include warm-up). With pp stages the world has pp processes, so on a
machine with fewer cores than processes the stages share cores: CPU numbers show the schedule's
overheads and bubble, not the speed-up a pipeline gives on separate devices.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP_MS = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+)")


def time_step(pp: int, virtual: bool, args: argparse.Namespace) -> float:
    half = args.iters // 2
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(pp), "-m", "megamm.train",
        "--config", str(ROOT / "examples" / "tiny_cpu.yaml"),
        "--set", f"model.language.transformer.num_layers={args.layers}",
        "--pipeline-model-parallel-size", str(pp), "--micro-batch-size", "1",
        "--global-batch-size", str(args.global_batch), "--train-iters", str(args.iters),
        "--log-interval", str(half), "--eval-iters", "0", "--lr-warmup-iters", "0",
    ]
    if virtual:
        command += ["--num-layers-per-virtual-pipeline-stage", str(args.layers // (2 * pp))]
    done = subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    times = [float(x) for x in STEP_MS.findall(done.stdout)]
    return times[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=12, help="training steps per configuration (even)")
    parser.add_argument("--layers", type=int, default=8, help="language-model layers")
    parser.add_argument("--global-batch", type=int, default=16, help="samples per step (micro batch 1)")
    args = parser.parse_args()
    rows = [(1, False), (2, False), (4, False), (4, True)]
    results = [(pp, virtual, time_step(pp, virtual, args)) for pp, virtual in rows]
    base = results[0][2]
    microbatches = args.global_batch
    print(f"{'layout':<22}{'ms/step':>10}{'vs pp=1':>10}{'bubble (pp-1)/(vp*M)':>24}")
    for pp, virtual, ms in results:
        vp = 2 if virtual else 1
        label = f"pp={pp}" + (" vp=2 (interleaved)" if virtual else "")
        bubble = (pp - 1) / (vp * microbatches)
        print(f"{label:<22}{ms:>10.1f}{ms / base:>10.2f}{100 * bubble:>23.1f}%")


if __name__ == "__main__":
    main()
