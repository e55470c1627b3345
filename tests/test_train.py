"""The torchrun entry point end to end: the loss falls, logs and TensorBoard are written, bad steps
are skipped and counted, and a run that keeps failing stops with a clear message."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "tiny_cpu.yaml")


@pytest.mark.slow
def test_torchrun_tiny_config_learns(tmp_path: Path) -> None:
    """2 processes, tp=2 with sequence parallelism, 30 steps: the logged loss falls well below its start."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megamm.train",
        "--config", EXAMPLE, "--tensor-model-parallel-size", "2", "--sequence-parallel", "--train-iters", "30",
        "--log-interval", "5", "--eval-interval", "15", "--eval-iters", "1", "--tensorboard-dir", str(tmp_path / "tb"),
    ]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"\| lm loss: ([0-9.E+-]+) \| grad norm", done.stdout)]
    assert len(losses) == 6, done.stdout
    assert losses[-1] < 0.5 * losses[0], losses
    assert "validation at iteration 15" in done.stdout and "validation at iteration 30" in done.stdout
    assert re.search(r"done: 30 iterations .* skipped iterations: 0", done.stdout)
    for field in ("consumed samples:", "tokens/s:", "TFLOP/s/device:", "MFU: n/a", "peak memory (GiB):"):
        assert field in done.stdout
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"


def test_bad_flags_exit_2_with_every_problem() -> None:
    command = [sys.executable, "-m", "megamm.train", "--config", EXAMPLE, "--global-batch-size", "6", "--bf16", "--fp16"]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--global-batch-size 6 must be a positive multiple" in done.stderr
    assert "--bf16 and --fp16 are mutually exclusive" in done.stderr


def _run(argv: list[str]) -> dict:
    from megamm.train import read_config, run

    return run(read_config(argv, 1))


SMALL = ["--config", EXAMPLE, "--log-interval", "100", "--set", "model.language.transformer.num_layers=2",
         "--seq-length", "40", "--global-batch-size", "8", "--eval-iters", "0"]


@pytest.mark.slow
def test_fp16_overflow_steps_are_skipped_then_training_continues() -> None:
    """A loss scale of 2^24 overflows fp16 gradients: those steps are skipped and counted, the
    scale halves until it fits, and training then proceeds and learns."""
    figures = run_distributed(_run, 1, SMALL + ["--fp16", "--initial-loss-scale", str(2.0**24),
                                                "--max-skipped-iters-in-a-row", "20", "--train-iters", "25"])[0]
    assert figures["skipped"] > 0
    assert math.isfinite(figures["final_loss"]) and figures["final_loss"] < figures["first_loss"]


@pytest.mark.slow
def test_bf16_training_learns() -> None:
    figures = run_distributed(_run, 1, SMALL + ["--bf16", "--train-iters", "15"])[0]
    assert figures["skipped"] == 0
    assert figures["final_loss"] < 0.85 * figures["first_loss"]


@pytest.mark.slow
def test_diverging_run_stops_with_a_clear_message() -> None:
    with pytest.raises(RuntimeError, match="3 iterations in a row had a non-finite loss or gradient"):
        run_distributed(_run, 1, SMALL + ["--lr", "1e30", "--min-lr", "1e30", "--clip-grad", "0",
                                          "--max-skipped-iters-in-a-row", "3", "--train-iters", "20"])


@pytest.mark.slow
def test_torch_compile_logs_the_compiling_step_once_and_leaves_it_out_of_the_throughput() -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "megamm.train",
        *SMALL, "--torch-compile", "--train-iters", "3", "--lr-warmup-iters", "0", "--log-interval", "1",
    ]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(re.findall(r"torch\.compile: the first step took [0-9.]+ s", done.stdout)) == 1, done.stdout
    throughput = re.findall(r"iteration +(\d)/3 .*\| tokens/s: (\S+) \|", done.stdout)
    # Iteration 1 is the compiling step alone: no timed step, no figure; the next ones are timed.
    assert throughput[0] == ("1", "nan") and [i for i, _ in throughput] == ["1", "2", "3"], done.stdout
    assert all(float(tokens) > 0 for _, tokens in throughput[1:]), done.stdout


def _run_world(argv: list[str]) -> dict:
    """`_run` on every rank of a spawned job (its size from the environment, as torchrun gives it)."""
    from megamm.train import read_config, run

    return run(read_config(argv, int(os.environ["WORLD_SIZE"])))


def _run_each(argvs: list[list[str]]) -> list[dict]:
    """`_run_world` of each argv in turn, in one spawned job: one process start-up for several runs
    (each builds its own groups on the one process group)."""
    return [_run_world(argv) for argv in argvs]


QWEN2_VL = ["--config", str(ROOT / "examples" / "qwen2_vl_tiny_cpu.yaml"), "--train-iters", "12", "--log-interval", "100",
            "--eval-iters", "0", "--set", "model.language.transformer.rotary_base=50"]
# A rope base of 50 turns every rotary pair over the sample. Which stage gets which batch keys is
# checked key by key in tests/training/test_data.py; this is the end-to-end run of the family.


@pytest.mark.slow
def test_qwen2_vl_example_trains_alike_in_one_process_through_a_pipeline_and_at_cp2() -> None:
    """The native-resolution family through megamm.train (synthetic images of varying sizes, M-RoPE
    positions to every stage): one process, pp=2 and cp=2 give the same losses, and the loss falls."""
    one = run_distributed(_run, 1, QWEN2_VL)[0]
    assert one["final_loss"] < 0.9 * one["first_loss"], one
    layouts = (["--pipeline-model-parallel-size", "2"], ["--context-parallel-size", "2"])
    others = run_distributed(_run_each, 2, [QWEN2_VL + layout for layout in layouts], timeout=600)[-1]
    for layout, other in zip(layouts, others, strict=True):
        for key in ("first_loss", "final_loss"):
            assert math.isclose(other[key], one[key], rel_tol=1e-5), (layout, key, other[key], one[key])


ANYRES_OVERRIDES = """model:
  anyres:
    image_grid_pinpoints: [[32, 64], [64, 32], [64, 64]]
training:
  seq_length: 160
"""


@pytest.mark.slow
def test_any_resolution_model_trains_on_mock_data(tmp_path: Path) -> None:
    """LLaVA-NeXT-style tiling through megamm.train on --mock-data (images of random sizes, each with
    its own tiles and tokens, checked per sample by the model): the loss falls."""
    (tmp_path / "anyres.yaml").write_text(ANYRES_OVERRIDES)
    figures = run_distributed(_run, 1, SMALL + ["--config", str(tmp_path / "anyres.yaml"), "--train-iters", "12",
                                                "--lr-warmup-iters", "2"])[0]
    assert figures["skipped"] == 0
    assert figures["final_loss"] < 0.9 * figures["first_loss"], figures
