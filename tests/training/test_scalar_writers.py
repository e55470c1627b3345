"""The log's scalars reach TensorBoard and Weights & Biases: a short offline training run, read back
with W&B's own reader of its transaction log (`wandb leet inspect --json`) and TensorBoard's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "tiny_cpu.yaml")
SCALARS = ("lm-loss", "learning-rate", "grad-norm", "tokens-per-second", "tflops-per-device")


def _train(argv: list[str]) -> dict:
    from megamm.train import read_config, run

    return run(read_config(argv, 1))


def _wandb_records(run_file: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
                          check=True, capture_output=True, text=True, timeout=120)
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def _tensorboard(directory: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_an_offline_wandb_run_holds_the_scalars_and_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    argv = ["--config", EXAMPLE, "--set", "model.language.transformer.num_layers=2", "--seq-length", "40",
            "--global-batch-size", "8", "--train-iters", "3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "1",
            "--num-workers", "0", "--tensorboard-dir", str(tmp_path / "tb"), "--save", str(tmp_path / "ckpt"),
            "--wandb-project", "megamm-test", "--wandb-exp-name", "tiny"]
    figures = run_distributed(_train, 1, argv)[0]
    # The directory defaults to <--save>/wandb, as in Megatron.
    run_files = list((tmp_path / "ckpt" / "wandb").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files
    records = _wandb_records(run_files[0])
    run = next(r["run"] for r in records if r["type"] == "run")
    assert (run["project"], run["display_name"]) == ("megamm-test", "tiny")
    config = run["config"]["update"]
    assert config["training"]["global_batch_size"] == 8 and config["training"]["train_iters"] == 3
    assert config["model"]["language"]["transformer"]["num_layers"] == 2
    assert config["world_size"] == 1 and config["data_parallel_size"] == 1
    history: dict[int, dict[str, float]] = {}
    for record in records:
        if record["type"] == "history":
            history.setdefault(record["history"]["step"]["num"], {}).update(record["history"]["item"])
    assert sorted(history) == [1, 2, 3]
    assert history[1]["lm-loss"] == pytest.approx(figures["first_loss"], rel=1e-12)
    assert history[3]["lm-loss"] == pytest.approx(figures["final_loss"], rel=1e-12)
    assert history[3]["validation-lm-loss"] == pytest.approx(figures["eval_loss"], rel=1e-12)
    # The same scalars at the same steps as TensorBoard (which keeps float32).
    tensorboard = _tensorboard(tmp_path / "tb")
    assert set(tensorboard) == {*SCALARS, "validation-lm-loss"}
    for tag, steps in tensorboard.items():
        for step, value in steps.items():
            assert history[step][tag] == pytest.approx(value, rel=1e-6), (tag, step)
