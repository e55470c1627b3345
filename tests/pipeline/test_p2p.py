"""A rank that raises inside the pipeline schedule ends the torchrun job with its error quickly,
not after the collective timeout (here 5 minutes) while its peer waits for a gradient."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_failing_stage_ends_the_job() -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        str(ROOT / "tests" / "fail_on_last_stage.py"), "--config", str(ROOT / "examples" / "tiny_cpu.yaml"),
        "--pipeline-model-parallel-size", "2", "--distributed-timeout-minutes", "5", "--train-iters", "5",
        "--eval-iters", "0", "--lr-warmup-iters", "0",
    ]
    started = time.monotonic()
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    assert "injected failure on the last pipeline stage" in done.stdout + done.stderr
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end"
