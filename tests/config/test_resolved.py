"""What a run config implies (ResolvedConfig), each value against a hand computation; the model of a
checkpoint that --load names (taken when the YAML has none, every disagreement listed, before any
process group); the shared normalization default and tokenizer check."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import yaml

from megamm.checkpoint import format
from megamm.config import ConfigError, LanguageConfig
from megamm.config.parsing import parse_run_config, run_config_from_dict, run_config_to_dict
from megamm.config.precision import DTYPES, dtype_named, precision_name
from megamm.config.resolved import resolve
from megamm.data.tokenizer import check_tokenizer
from megamm.train import read_config
from tests.tiny import language_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny_cpu.yaml"  # language 4 layers, vision 3 layers


def _argv(*flags: str) -> list[str]:
    return ["--config", str(EXAMPLE), *flags]


def test_derived_values_match_a_hand_computation() -> None:
    # 8 processes = tp 2 x pp 2 x dp 2; 16 samples / (micro 2 x dp 2) = 4 microbatches per rank;
    # 4 language layers / (pp 2 x 1 layer per chunk) = 2 chunks per stage.
    config = resolve(parse_run_config(_argv(
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
        "--num-layers-per-virtual-pipeline-stage", "1", "--micro-batch-size", "2", "--global-batch-size", "16",
        "--train-iters", "30", "--bf16", "--recompute-granularity", "full", "--recompute-num-layers", "4",
        "--freeze-ViT"), 8), 8)
    assert config.world_size == 8
    assert config.data_parallel_size == 2
    assert config.microbatches_per_step == 4
    assert config.virtual_stages == 2
    assert config.lr_decay_iters == 30  # --lr-decay-iters unset: --train-iters
    assert config.params_dtype is torch.bfloat16
    assert config.sequence_parallel is True
    vt, lt = config.model.vision.transformer, config.model.language.transformer
    assert (vt.params_dtype, lt.params_dtype) == (torch.bfloat16, torch.bfloat16)
    assert (vt.recompute, lt.recompute) == ("full", "full")
    assert (vt.recompute_num_layers, lt.recompute_num_layers) == (3, 4)  # the ViT has 3 layers
    assert config.model.freeze_vision and not config.model.freeze_language
    # The sections as written are left alone.
    assert config.run.model.language.transformer.params_dtype is torch.float32
    assert config.run.model.vision.transformer.recompute == "none"


def test_derived_values_of_the_other_branches() -> None:
    config = resolve(parse_run_config(_argv(
        "--sequence-parallel", "--lr-decay-iters", "20", "--fp16", "--micro-batch-size", "1"), 2), 2)
    assert config.data_parallel_size == 2 and config.microbatches_per_step == 8  # 16 / (1 x 2)
    assert config.virtual_stages == 1
    assert config.lr_decay_iters == 20
    assert config.params_dtype is torch.float16
    assert config.sequence_parallel is False  # --sequence-parallel with tp 1 splits nothing
    plain = resolve(parse_run_config(_argv(), 1), 1)
    assert plain.params_dtype is torch.float32 and plain.model.language.transformer.recompute == "none"


def test_resolve_lists_every_problem() -> None:
    run = parse_run_config(_argv(), 1)
    with pytest.raises(ConfigError, match="--global-batch-size 16 must be a positive multiple"):
        resolve(run, 32)


def test_dtype_names() -> None:
    assert [precision_name(False, False), precision_name(True, False), precision_name(False, True)] == [
        "fp32", "bf16", "fp16"]
    assert DTYPES["bf16"] is torch.bfloat16 and dtype_named("fp16") is torch.float16
    with pytest.raises(ValueError, match="--dtype must be one of bf16, fp16, fp32, got 'fp8'"):
        dtype_named("fp8", "--dtype")


def test_saved_config_leaves_out_build_time_fields_and_reads_back() -> None:
    run = parse_run_config(_argv("--bf16", "--recompute-granularity", "selective"), 1)
    tree = run_config_to_dict(run)
    for tower in ("vision", "language"):
        assert not {"params_dtype", "recompute", "recompute_num_layers"} & set(tree["model"][tower]["transformer"])
    assert run_config_from_dict(tree) == run


# ---- the model of the checkpoint --load names -----------------------------------------------------


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    """A stand-in for a checkpoint of the example run: its megamm.json, as a save writes it."""
    directory = tmp_path / "ckpt" / "iter_0000005"
    directory.mkdir(parents=True)
    format.write_description(directory, format.describe(5, {}, "none", run_config_to_dict(parse_run_config(_argv(), 1))))
    (tmp_path / "ckpt" / format.LATEST).write_text(directory.name + "\n")
    return tmp_path / "ckpt"


def _training_only(tmp_path: Path) -> Path:
    tree = yaml.safe_load(EXAMPLE.read_text())
    path = tmp_path / "training.yaml"
    path.write_text(yaml.safe_dump({"training": tree["training"]}))
    return path


def test_model_comes_from_the_checkpoint_when_the_yaml_has_none(tmp_path: Path, checkpoint: Path) -> None:
    config = read_config(["--config", str(_training_only(tmp_path)), "--load", str(checkpoint)], 1)
    assert config.run.model == parse_run_config(_argv(), 1).model
    assert not dist.is_initialized()


def test_a_disagreeing_model_section_lists_every_difference(tmp_path: Path, checkpoint: Path) -> None:
    tree = yaml.safe_load(EXAMPLE.read_text())
    tree["model"]["language"]["transformer"]["num_layers"] = 2
    tree["model"]["vision"]["select_layer"] = -1
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as raised:
        read_config(["--config", str(path), "--load", str(checkpoint), "--global-batch-size", "6"], 1)
    suffix = "(leave the model section out to use the checkpoint's)"
    assert raised.value.problems[:2] == [
        f"model.language.transformer.num_layers: the config says 2, checkpoint {checkpoint} has 4 {suffix}",
        f"model.vision.select_layer: the config says -1, checkpoint {checkpoint} has -2 {suffix}",
    ]
    # Reported with the other problems of the run.
    assert any("--global-batch-size 6" in p for p in raised.value.problems[2:])
    assert not dist.is_initialized()


def test_set_on_a_checkpoint_model_is_checked_too(tmp_path: Path, checkpoint: Path) -> None:
    argv = ["--config", str(_training_only(tmp_path)), "--load", str(checkpoint)]
    with pytest.raises(ConfigError) as raised:
        read_config([*argv, "--set", "model.language.vocab_size=300"], 1)
    assert [p.split(":")[0] for p in raised.value.problems] == ["model.language.vocab_size"]
    # A value equal to the checkpoint's is no disagreement.
    assert read_config([*argv, "--set", "model.language.vocab_size=256"], 1).model.language.vocab_size == 256


def test_an_explicit_load_directory_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    """Nothing saved there: no model comes from it, and the run does not start from the initialization."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as raised:
        read_config(["--config", str(_training_only(tmp_path)), "--load", str(tmp_path / "empty")], 1)
    assert raised.value.problems == [(f"model: missing; give a --config file with a model section (--load "
                                     f"{tmp_path / 'empty'} holds no checkpoint to take it from)")]
    with pytest.raises(ConfigError, match="holds no megamm checkpoint"):
        read_config(_argv("--load", str(tmp_path / "empty")), 1)
    assert not dist.is_initialized()


def test_the_entry_point_reports_the_differences_before_starting(tmp_path: Path, checkpoint: Path) -> None:
    command = [sys.executable, "-m", "megamm.train", "--config", str(EXAMPLE), "--load", str(checkpoint),
               "--set", "model.projector.type=linear"]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"model.projector.type: the config says 'linear', checkpoint {checkpoint} has 'mlp2x_gelu'" in done.stderr


# ---- one tokenizer check (the normalization default: tests/models/test_families.py) -----------------------------------------------


def test_tokenizer_check_names_every_mismatch() -> None:
    language: LanguageConfig = replace(language_config(), vocab_size=100, image_token_id=99)
    fits = SimpleNamespace(vocab_size=100, image_token_id=99, image_token="<image>")
    check_tokenizer(fits, language, "--tokenizer-model t.model")
    wrong = SimpleNamespace(vocab_size=101, image_token_id=5, image_token="<image>")
    with pytest.raises(ValueError) as raised:
        check_tokenizer(wrong, language, "--tokenizer-model t.model")
    assert str(raised.value) == (
        "--tokenizer-model t.model does not fit the model: it has 101 tokens (added image/pad tokens included) "
        "but model.language.vocab_size is 100; it gives the image token '<image>' id 5 but "
        "model.language.image_token_id is 99"
    )
