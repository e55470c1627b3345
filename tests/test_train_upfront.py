"""Every configuration problem is reported before anything starts: run as a user runs it (`python -m
megamm.train`, once under torchrun), each bad setting ends the run with status 2 and one message
listing all problems (the flags', the config's and those of the files it names), printed once, with
no usage text, no traceback and no model built (the startup line " megamm: world" never appears)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from megamm.checkpoint import format
from megamm.config.parsing import parse_run_config, run_config_to_dict
from megamm.config.run import TrainingConfig
from megamm.data.tokenizer import load_tokenizer
from megamm.training.preflight import _checkpoint_problems
from tests.data_fixtures import DatasetFiles, write_dataset

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "tiny_cpu.yaml")
HEADER = "megamm.train: invalid configuration:"
STARTED = " megamm: world"  # the first line of a run whose model and optimizer were built


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> DatasetFiles:
    return write_dataset(tmp_path_factory.mktemp("upfront"), rows=6)


def _data_flags(files: DatasetFiles, data_path: str, image_token_id: int | None = None) -> list[str]:
    """Flags of a run on dataset files whose model fits the fixture's tokenizer (unless told otherwise)."""
    tokenizer = load_tokenizer(files.tokenizer)
    image_id = tokenizer.image_token_id if image_token_id is None else image_token_id
    return ["--no-mock-data", "--eval-iters", "0", "--data-path", data_path, "--image-folder", str(files.images),
            "--tokenizer-model", str(files.tokenizer), "--set", f"model.language.vocab_size={tokenizer.vocab_size}",
            "--set", f"model.language.image_token_id={image_id}"]


def _train(*flags: str, rank: int = 0, world_size: int = 1) -> subprocess.CompletedProcess:
    environment = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size)}
    return subprocess.run([sys.executable, "-m", "megamm.train", "--config", EXAMPLE, *flags], check=False,
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)


def _problems(done: subprocess.CompletedProcess) -> list[str]:
    """The listed problems, after checking that the run stopped up front with one message."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count(HEADER) == 1, done.stderr
    assert "usage:" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert STARTED not in done.stdout, done.stdout
    return [line.removeprefix("  - ") for line in done.stderr.split(HEADER, 1)[1].splitlines() if line]


def test_a_missing_data_path_is_listed_with_the_other_problems(files: DatasetFiles) -> None:
    missing = str(files.root / "nope.json")
    problems = _problems(_train(*_data_flags(files, missing), "--global-batch-size", "6"))
    assert f"--data-path {missing}: no such file" in problems
    assert any(p.startswith("--global-batch-size 6 must be a positive multiple") for p in problems), problems


def test_a_data_path_that_is_no_dataset_is_refused(files: DatasetFiles, tmp_path: Path) -> None:
    picture = tmp_path / "cat.jpg"
    picture.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200))
    empty_shard = tmp_path / "empty.tar"
    empty_shard.write_bytes(bytes(1024))  # an end-of-archive block and nothing else
    problems = _problems(_train(*_data_flags(files, str(picture)), "--valid-data-path", str(empty_shard)))
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"--data-path {picture}: neither a JSON list nor JSONL"), problems
    assert problems[1] == f"--valid-data-path {empty_shard}: tar shard {empty_shard} holds no members"


def test_a_good_dataset_passes_the_probe(files: DatasetFiles) -> None:
    """The same flags with the fixture's JSONL: the only problem left is the one planted beside it."""
    problems = _problems(_train(*_data_flags(files, str(files.train)), "--global-batch-size", "6"))
    assert len(problems) == 1 and problems[0].startswith("--global-batch-size 6"), problems


def test_unknown_flags_and_every_wrong_value_are_listed_together() -> None:
    problems = _problems(_train("--lr-warmup", "3", "--micro-batch-size", "two", "--lr-decay-style", "cos",
                                "--train-iters", "--bf16=yes", "stray"))
    assert problems == [
        "--train-iters: expected one argument",
        "--bf16/--no-bf16: ignored explicit argument 'yes'",
        "--lr-warmup: unknown flag (did you mean --lr-warmup-iters?)",
        "'stray': unexpected argument (every setting is a --flag)",
        "--micro-batch-size: expected int, got 'two'",
        "--lr-decay-style: expected one of 'constant', 'linear', 'cosine', got 'cos'",
    ]


def test_a_set_type_error_does_not_hide_the_other_problems() -> None:
    problems = _problems(_train(
        "--set", "training.lr=abc", "--min-lr", "1", "--global-batch-size", "6", "--bf16", "--fp16",
        "--seq-length", "0", "--straggler-threshold", "0.5", "--lr-warmup-iters", "500", "--clip-grad", "-1"))
    assert problems[0] == "config.training.lr: expected float, got 'abc'"
    for expected in ("--global-batch-size 6 must be a positive multiple", "--seq-length must be >= 1, got 0",
                     "--bf16 and --fp16 are mutually exclusive", "--lr-warmup-iters 500 exceeds the decay length",
                     "--straggler-threshold is a ratio of step times", "--clip-grad must be >= 0"):
        assert sum(p.startswith(expected) for p in problems) == 1, (expected, problems)
    # The check of --min-lr against --lr reads the broken --lr: skipped, not reported with a made-up value.
    assert len(problems) == 7 and not any("--min-lr" in p for p in problems), problems


def test_a_tokenizer_that_does_not_fit_the_model_is_caught_up_front(files: DatasetFiles) -> None:
    problems = _problems(_train(*_data_flags(files, str(files.train), image_token_id=7)))
    image_id = load_tokenizer(files.tokenizer).image_token_id
    assert problems == [(f"--tokenizer-model {files.tokenizer} does not fit the model: it gives the image token "
                        f"'<image>' id {image_id} but model.language.image_token_id is 7")]


def test_an_explicit_load_must_hold_a_checkpoint(tmp_path: Path) -> None:
    problems = _problems(_train("--load", str(tmp_path / "nope"), "--finetune"))
    assert problems == [(f"--load {tmp_path / 'nope'}: no such directory; megamm does not start from the "
                        "initialization when --load is given (Megatron does): leave --load out to train from scratch")]
    (tmp_path / "empty").mkdir()
    problems = _problems(_train("--load", str(tmp_path / "empty")))
    assert problems == [(f"--load {tmp_path / 'empty'}: holds no megamm checkpoint (neither megamm.json nor latest); "
                        "megamm does not start from the initialization when --load is given (Megatron does): "
                        "leave --load out to train from scratch")]


def _checkpoint_at(save: Path, iteration: int) -> Path:
    """A stand-in for a save directory whose newest checkpoint is at `iteration` (its description, as
    a save writes it; the checks read nothing else)."""
    directory = format.iteration_dir(save, iteration)
    directory.mkdir(parents=True)
    config = run_config_to_dict(parse_run_config(["--config", EXAMPLE], 1))
    format.write_description(directory, format.describe(iteration, {}, "none", config))
    (save / format.LATEST).write_text(directory.name + "\n")
    return directory


def test_resuming_with_nothing_left_to_train_is_a_problem_not_nan(tmp_path: Path) -> None:
    directory = _checkpoint_at(tmp_path / "ckpt", 24)
    flags = ("--load", str(tmp_path / "ckpt"), "--train-iters", "1", "--lr-warmup-iters", "0")
    problems = _problems(_train(*flags))
    assert problems == [(f"nothing to train: checkpoint {directory} is at iteration 24, --train-iters 1 "
                        "(--train-iters counts from the start of training; raise it, or pass --finetune to start at 0)")]
    # --finetune starts at iteration 0: the same checkpoint and --train-iters are fine then.
    finetune = _train(*flags, "--finetune", "--set", "training.lr=abc")
    assert _problems(finetune) == ["config.training.lr: expected float, got 'abc'"]


def test_a_blended_dataset_resumes_only_at_its_global_batch_size(tmp_path: Path) -> None:
    """A blend's sample order depends on --global-batch-size: another one on resume is refused, the
    same one (or a single dataset, which follows consumed samples) is accepted."""
    directory = _checkpoint_at(tmp_path / "ckpt", 4)
    saved = format.read_description(directory)["config"]["training"]["global_batch_size"]
    blend = ["0.5", "a.json", "0.5", "b.json"]
    run = TrainingConfig(load=str(tmp_path / "ckpt"), train_iters=10, data_path=blend, global_batch_size=2 * saved)
    assert _checkpoint_problems(run) == [
        (f"--global-batch-size {2 * saved}: checkpoint {directory} trained with {saved}, and a blended --data-path "
         f"is sized --train-iters x --global-batch-size, so another batch size would change its sample order; "
         f"resume with --global-batch-size {saved} (a single dataset or --mock-data can change it)")]
    assert _checkpoint_problems(replace(run, global_batch_size=saved)) == []
    assert _checkpoint_problems(replace(run, data_path=["a.json"])) == []


def test_other_ranks_print_nothing_and_exit_2() -> None:
    done = _train("--bogus", rank=1, world_size=2)
    assert done.returncode == 2 and done.stdout == "" and done.stderr == "", done.stderr


@pytest.mark.slow
def test_under_torchrun_the_problems_are_printed_once(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megamm.train",
               "--config", EXAMPLE, "--bogus", "--micro-batch-size", "x", "--load", str(tmp_path / "nope")]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count(HEADER) == 1, output
    for problem in ("--bogus: unknown flag", "--micro-batch-size: expected int, got 'x'", f"--load {tmp_path / 'nope'}"):
        assert output.count(problem) == 1, (problem, output)
    assert "usage:" not in output and STARTED not in output
    assert output.count("exitcode  : 2") + output.count("exitcode : 2") >= 1, output
