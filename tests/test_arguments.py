"""The run configuration: YAML + flags, one object, every violation listed before any process group."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megamm.config import ConfigError
from megamm.config.parsing import build_parser, parse_run_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_cpu.yaml"


def test_flags_override_yaml_and_set_overrides_model() -> None:
    config = parse_run_config(
        ["--config", str(EXAMPLE), "--micro-batch-size", "2", "--tensor-model-parallel-size", "2",
         "--sequence-parallel", "--freeze-LM", "--set", "model.language.transformer.num_layers=2", "--lr", "0.5"],
        world_size=4,
    )
    assert config.training.micro_batch_size == 2
    assert config.parallel.tensor_model_parallel_size == 2 and config.parallel.sequence_parallel
    assert config.training.freeze_LM and config.training.lr == 0.5
    assert config.model.language.transformer.num_layers == 2
    assert config.training.global_batch_size == 16  # from the YAML
    assert config.accumulation_steps(4) == 4


def test_every_violation_is_listed_at_once(tmp_path: Path) -> None:
    tree = yaml.safe_load(EXAMPLE.read_text())
    tree["model"]["language"]["transformer"]["num_attention_heads"] = 6
    tree["model"]["vision"]["colour"] = "red"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as raised:
        parse_run_config(
            ["--config", str(path), "--global-batch-size", "10", "--bf16", "--fp16", "--min-lr", "1", "--lr", "0.1"],
            world_size=2,
        )
    text = str(raised.value)
    assert "config.model.vision.colour: unknown field" in text
    with pytest.raises(ConfigError) as raised:
        tree["model"]["vision"].pop("colour")
        path.write_text(yaml.safe_dump(tree))
        parse_run_config(
            ["--config", str(path), "--global-batch-size", "10", "--bf16", "--fp16", "--min-lr", "1", "--lr", "0.1",
             "--tensor-model-parallel-size", "4", "--pipeline-model-parallel-size", "3"],
            world_size=12,
        )
    problems = raised.value.problems
    joined = "\n".join(problems)
    for expected in (
        "language.num_attention_heads 6 not divisible by num_query_groups 4",
        "language.num_attention_heads 6 not divisible by tensor-model-parallel size 4",
        "--global-batch-size 10 must be a positive multiple of --micro-batch-size 4 x data-parallel size 1 = 4",
        "--bf16 and --fp16 are mutually exclusive",
        "need 0 <= --min-lr (1.0) <= --lr (0.1)",
        "4 language layers are not divisible by 3 pipeline stages",
    ):
        assert expected in joined, expected


def test_missing_model_and_data_are_reported() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_run_config([], world_size=1)
    assert "model: missing" in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        parse_run_config(["--config", str(EXAMPLE), "--no-mock-data"], world_size=1)
    assert "no training data" in str(raised.value)


def test_help_documents_megatron_flags() -> None:
    text = build_parser().format_help()
    for flag in ("--tensor-model-parallel-size", "--sequence-parallel", "--micro-batch-size", "--global-batch-size",
                 "--train-iters", "--lr", "--min-lr", "--lr-decay-style", "--lr-warmup-iters", "--weight-decay",
                 "--clip-grad", "--bf16", "--fp16", "--seed", "--use-distributed-optimizer", "--eval-interval",
                 "--eval-iters", "--log-interval", "--freeze-LM", "--freeze-ViT", "--freeze-projector"):
        assert flag in text, flag


def test_values_are_type_checked_before_anything_runs() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_run_config(
            ["--config", str(EXAMPLE), "--set", "training.train_iters=abc", "--set",
             "model.language.transformer.activation=relu", "--set", "training.lr=3e-3"],
            world_size=1,
        )
    text = str(raised.value)
    assert "config.training.train_iters: expected int, got 'abc'" in text
    assert "config.model.language.transformer.activation: expected one of 'gelu'" in text
    assert "training.lr" not in text  # "3e-3" is a float even though YAML reads it as a string


def test_freeze_flags_override_the_model_section_both_ways() -> None:
    from megamm.config.run import apply_training_switches
    frozen = parse_run_config(["--config", str(EXAMPLE), "--set", "model.freeze_vision=true"], world_size=1)
    assert apply_training_switches(frozen).freeze_vision
    thawed = parse_run_config(
        ["--config", str(EXAMPLE), "--set", "model.freeze_vision=true", "--no-freeze-ViT", "--freeze-LM"], world_size=1
    )
    assert not apply_training_switches(thawed).freeze_vision
    assert apply_training_switches(thawed).freeze_language
