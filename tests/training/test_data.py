"""Training on dataset files end to end: a corrupted dataset is trained through with every bad record
skipped and counted, packed rows (here through a 2-stage pipeline) train exactly like padded ones, and
a global batch balanced over dp ranks trains like the contiguous split."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megamm.data.tokenizer import load_tokenizer
from tests.data_fixtures import DatasetFiles, write_dataset
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory: pytest.TempPathFactory) -> DatasetFiles:
    return write_dataset(tmp_path_factory.mktemp("train_corrupt"), rows=24, corrupt=True)


def _argv(files: DatasetFiles, *extra: str) -> list[str]:
    tokenizer = load_tokenizer(files.tokenizer)
    return [
        "--config", EXAMPLE, "--no-mock-data", "--data-path", str(files.train), "--image-folder", str(files.images),
        "--tokenizer-model", str(files.tokenizer), "--chat-template", "mistral", "--seq-length", "96",
        "--set", f"model.language.vocab_size={tokenizer.vocab_size}",
        "--set", f"model.language.image_token_id={tokenizer.image_token_id}",
        "--set", "model.language.transformer.num_layers=2", "--log-interval", "100", "--eval-iters", "0",
        "--lr-warmup-iters", "1",
        *extra,
    ]


def _run(argv: list[str], world_size: int) -> dict:
    from megamm.train import read_config, run

    return run(read_config(argv, world_size))


@pytest.mark.slow
def test_corrupted_dataset_trains_through_and_reports_counts(corrupted: DatasetFiles) -> None:
    # 32 rows (24 good, 8 bad), 3 steps of 12 samples: position 0..35 covers the whole first epoch,
    # so every bad row is met at least once.
    argv = _argv(corrupted, "--micro-batch-size", "2", "--global-batch-size", "12", "--train-iters", "3",
                 "--num-workers", "1", "--valid-data-path", str(corrupted.train), "--eval-iters", "1")
    figures = run_distributed(_run, 2, argv, 2)
    data = figures[0]["data"]
    assert figures[0] == figures[1]
    assert data["records"] - data["bad"] == 36
    for kind, rows in corrupted.corrupted.items():
        assert data[f"bad/{kind}"] >= rows, (kind, data)
    assert data["bad"] == sum(v for k, v in data.items() if k.startswith("bad/"))
    assert math.isfinite(figures[0]["final_loss"]) and math.isfinite(figures[0]["eval_loss"])


@pytest.mark.slow
def test_packed_pipeline_training_equals_padded(corrupted: DatasetFiles) -> None:
    common = ("--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3", "--num-workers", "0")
    padded = run_distributed(_run, 1, _argv(corrupted, *common), 1)[0]
    packed = run_distributed(
        _run, 2, _argv(corrupted, *common, "--pack-sequences", "--pipeline-model-parallel-size", "2"), 2
    )
    last = packed[1]  # the last pipeline stage reports
    for key in ("first_loss", "final_loss"):
        assert abs(last[key] - padded[key]) <= 1e-5 * abs(padded[key]), (key, last[key], padded[key])
    assert last["data"] == padded["data"]


@pytest.mark.slow
def test_resumed_run_reads_and_trains_like_an_uninterrupted_one(corrupted: DatasetFiles, tmp_path: Path) -> None:
    common = ("--micro-batch-size", "2", "--global-batch-size", "4", "--num-workers", "1",
              "--lr-decay-style", "constant", "--pack-sequences")
    whole = run_distributed(_run, 1, _argv(corrupted, *common, "--train-iters", "4"), 1)[0]
    save = str(tmp_path / "ckpt")
    run_distributed(_run, 1, _argv(corrupted, *common, "--train-iters", "2", "--save", save), 1)
    resumed = run_distributed(_run, 1, _argv(corrupted, *common, "--train-iters", "4", "--load", save), 1)[0]
    assert resumed["final_loss"] == whole["final_loss"]
    # The resumed run read only iterations 3 and 4: half of the samples, and the same bad ones.
    assert resumed["data"]["records"] - resumed["data"]["bad"] == 8


@pytest.mark.slow
def test_balanced_vision_work_trains_like_the_contiguous_split(tmp_path: Path) -> None:
    """dp=2 with dynamic tiling (0 to 4 tower inputs per sample): the balanced assignment differs
    from the contiguous split, yet the first step's loss, the per-token mean over the global batch,
    is the same to fp32 rounding."""
    from megamm.data.datasets import build_source
    from megamm.data.loader import PositionDataset, rank_positions
    from megamm.train import read_config
    from megamm.training.data import build_sample_builder, vision_work_balancer

    files = write_dataset(tmp_path, rows=24)
    common = ("--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "1", "--num-workers", "0",
              "--max-image-tiles", "4", "--seq-length", "128")
    balanced_argv = _argv(files, *common, "--balance-vision-work")
    config = read_config(balanced_argv, 2)
    t = config.training
    source, _ = build_source(t.data_path, t.image_folder, t.seed, 8)
    dataset = PositionDataset(source, build_sample_builder(config), t.seed)
    assert rank_positions(0, 8, 0, 2, balance=(vision_work_balancer(config), dataset.probe)) != rank_positions(0, 8, 0, 2)
    plain = run_distributed(_run, 2, _argv(files, *common), 2)[0]
    balanced = run_distributed(_run, 2, balanced_argv, 2)[0]
    assert abs(balanced["first_loss"] - plain["first_loss"]) <= 1e-5 * abs(plain["first_loss"])
    assert balanced["data"] == plain["data"]
