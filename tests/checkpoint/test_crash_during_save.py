"""A rank killed (SIGKILL) in the middle of a save leaves the previous checkpoint complete, loadable
and named by `latest`; the unfinished save is never taken for a checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--config", str(ROOT / "examples" / "tiny_cpu.yaml"), "--tensor-model-parallel-size", "2",
          "--eval-iters", "0", "--lr-warmup-iters", "0", "--log-interval", "1"]


def _torchrun(script: list[str], *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *script, *COMMON, *flags]
    return subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_killed_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    crashed = _torchrun([str(ROOT / "tests" / "kill_during_save.py")], "--train-iters", "6", "--save", str(save),
                        "--save-interval", "2")
    assert crashed.returncode != 0, crashed.stdout[-2000:]
    assert (save / "latest").read_text().strip() == "iter_0000002"
    assert (save / "iter_0000002" / "megamm.json").exists()
    assert not (save / "iter_0000004").exists()
    resumed = _torchrun(["-m", "megamm.train"], "--train-iters", "3", "--load", str(save))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"loaded checkpoint {save / 'iter_0000002'} (iteration 2)" in resumed.stdout
    assert " iteration        3/3 " in resumed.stdout
