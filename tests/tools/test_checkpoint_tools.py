"""tools/checkpoint_info.py and tools/reshard_checkpoint.py end to end, on a real tp=2 checkpoint.

The info tool must name the iteration, the layout and the model tensors in their global shapes (the
real vocabulary rows, not tp padding), and fail with exit status 2 on a directory that holds no
checkpoint. The reshard tool must rewrite the checkpoint for tp=1 x pp=2 with the same tensors and
the target layout in its description, and training resumed from the rewritten checkpoint at that
layout must take the same next steps (the first checks the weights, the second, after an update, the
optimizer state) as the tp=2 run that saved it took after saving.

The time is mostly process start-up on a small CPU machine: the info tool runs in this process
(its `main`), and the run that saves the checkpoint goes on to give the steps a resume must match.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
# 250 real tokens: padded to 256 rows in the model at tp 1 and 2, stored as 250 in the checkpoint.
VOCAB, HIDDEN = 250, 128
COMMON = [
    "--config", str(ROOT / "examples" / "tiny_cpu.yaml"),
    "--set", f"model.language.vocab_size={VOCAB}", "--set", f"model.language.image_token_id={VOCAB - 1}",
    "--eval-iters", "0", "--lr-warmup-iters", "0", "--log-interval", "1",
]


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: float = 180) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(f"{process.args} did not finish in {timeout} s:\n{stdout}{stderr}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _train_command(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(free_port()), "-m", "megamm.train", *COMMON, *flags]


def _succeeded(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout}{result.stderr}"
    return result.stdout


def _tool_command(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / name), *args]


def _info(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """tools/checkpoint_info.py's exit status, stdout and stderr for `args`."""
    spec = importlib.util.spec_from_file_location("checkpoint_info", ROOT / "tools" / "checkpoint_info.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    capsys.readouterr()
    status = tool.main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _info_json(capsys: pytest.CaptureFixture[str], directory: Path) -> dict:
    status, out, err = _info(capsys, str(directory), "--json")
    assert status == 0, err
    return json.loads(out)


def _model_shapes(info: dict) -> dict[str, list[int]]:
    (model,) = [g for g in info["groups"] if g["group"] == "model/"]
    return {t["name"]: t["shape"] for t in model["tensors"]}


def _loss_at(log: str, iteration: int, total: int) -> float:
    match = re.search(rf"iteration\s+{iteration}/{total} \|.*?lm loss: ([0-9.eE+-]+)", log)
    assert match, f"no log line for iteration {iteration}/{total} in:\n{log}"
    return float(match.group(1))


@pytest.mark.slow
def test_info_and_reshard_then_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, target = tmp_path / "tp2", tmp_path / "tp1_pp2"
    # Saved at iteration 2 (and 4, the end): its iterations 3 and 4 are what a resume from 2 must take.
    uninterrupted = _succeeded(_finish(_start(_train_command(
        "--tensor-model-parallel-size", "2", "--train-iters", "4", "--save-interval", "2", "--save", str(source)))))
    saved = source / "iter_0000002"
    reshard = _start(_tool_command("reshard_checkpoint.py", "--load", str(saved), "--save", str(target),
                                   "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"))

    # The text report, from the save directory (through `latest`: the end of the run).
    status, report, _ = _info(capsys, str(source))
    assert status == 0
    assert "iteration   4" in report
    assert "world 2 = tp 2 x pp 1 x dp 1" in report
    assert re.search(rf"model/language\.embedding\.weight\s+\[{VOCAB}x{HIDDEN}\]\s+float32", report)
    assert re.search(rf"model/language\.output_layer\.weight\s+\[{VOCAB}x{HIDDEN}\]", report)
    assert "optim/exp_avg/" in report and "total (logical)" in report

    # The JSON report, from the checkpoint directory itself.
    info = _info_json(capsys, saved)
    assert info["iteration"] == 2
    assert info["layout"] == {"world_size": 2, "tp": 2, "cp": 1, "pp": 1, "dp": 1, "virtual_stages": 1,
                              "sequence_parallel": False}
    shapes = _model_shapes(info)
    assert shapes["model/language.embedding.weight"] == [VOCAB, HIDDEN]
    # 8 query heads and 2 x 4 key/value groups of 16.
    assert shapes["model/language.decoder.layers.3.self_attention.qkv.weight"] == [2 * HIDDEN, HIDDEN]
    assert info["has_optimizer_state"] and info["total_bytes"] > 0 and info["disk_bytes"] > 0

    # Not a checkpoint: exit status 2 with a message.
    (tmp_path / "empty").mkdir()
    status, _, err = _info(capsys, str(tmp_path / "empty"))
    assert status == 2 and "checkpoint_info:" in err and "holds no checkpoint" in err

    # Reshard tp=2 -> tp=1 x pp=2 (world 2), then resume from it at that layout.
    assert "tp 1 x pp 2 x dp 1" in _succeeded(_finish(reshard))
    resume_target = _start(_train_command("--pipeline-model-parallel-size", "2", "--load", str(target),
                                          "--train-iters", "4"))
    resharded = _info_json(capsys, target)
    assert resharded["iteration"] == 2
    assert resharded["layout"] == {"world_size": 2, "tp": 1, "cp": 1, "pp": 2, "dp": 1, "virtual_stages": 1,
                                   "sequence_parallel": False}
    assert _model_shapes(resharded) == shapes
    assert [(g["group"], g["count"], g["bytes"]) for g in resharded["groups"] if g["group"] != "rng/"] == [
        (g["group"], g["count"], g["bytes"]) for g in info["groups"] if g["group"] != "rng/"
    ]
    assert resharded["resharded_from"] == str(saved)

    # Resumed from the resharded checkpoint at its own layout, training goes on as the tp=2 run did. The
    # loss of iteration 3 checks the model weights; that of iteration 4, after an update, the optimizer state.
    from_target = _succeeded(_finish(resume_target))
    assert "iteration        1/4" not in from_target
    for iteration in (3, 4):
        assert _loss_at(from_target, iteration, 4) == pytest.approx(_loss_at(uninterrupted, iteration, 4), rel=1e-5)
