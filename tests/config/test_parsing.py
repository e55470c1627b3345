"""The run configuration: YAML + flags, one object, every violation listed before any process group."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megamm.config import ConfigError
from megamm.config.parsing import build_parser, parse_run_config
from megamm.config.resolved import resolve
from megamm.config.run import training_model_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml"


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
    assert resolve(config, 4).microbatches_per_step == 4  # 16 / (micro 2 x dp 2)


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
    frozen = parse_run_config(["--config", str(EXAMPLE), "--set", "model.freeze_vision=true"], world_size=1)
    assert training_model_config(frozen).freeze_vision
    thawed = parse_run_config(
        ["--config", str(EXAMPLE), "--set", "model.freeze_vision=true", "--no-freeze-ViT", "--freeze-LM"], world_size=1
    )
    assert not training_model_config(thawed).freeze_vision
    assert training_model_config(thawed).freeze_language


def _help_entries() -> dict[str, str]:
    """Flag -> its whole --help entry (the lines up to the next flag), whitespace collapsed."""
    entries: dict[str, str] = {}
    flag = None
    for line in build_parser().format_help().splitlines():
        stripped = line.strip()
        if line.startswith("  --"):  # continuation lines are indented further
            flag = stripped.split()[0].split(",")[0]
            entries[flag] = stripped
        elif flag is not None and line.startswith(" " * 10) and stripped:
            entries[flag] += " " + stripped
        else:
            flag = None
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


def test_help_states_each_default_once() -> None:
    entries = _help_entries()
    assert len(entries) > 60
    for flag, text in entries.items():
        assert text.count("(default:") <= 1, text
    # "Defaults to another flag" is said once, naming the flag; a value default shows the value.
    assert entries["--projector-lr"].endswith("peak learning rate of the projector (default: --lr)")
    assert entries["--vision-lr"].endswith("(default: --lr)")
    assert entries["--lr-decay-iters"].endswith("(default: --train-iters)")
    assert entries["--recompute-num-layers"].endswith("(default: all)")
    assert entries["--freeze-LM"].endswith("(default: model.freeze_language)")
    assert entries["--lr"].endswith("(default: 0.0001)")
    # Unset by default (None): no "(default: None)".
    for flag in ("--save", "--load", "--config", "--tokenizer-model"):
        assert "(default:" not in entries[flag], entries[flag]


@pytest.mark.parametrize(("field", "value", "flag"), [
    ("recompute", "full", "--recompute-granularity"),
    ("recompute_num_layers", 1, "--recompute-num-layers"),
    ("params_dtype", "bf16", "--bf16 / --fp16"),
])
def test_build_time_fields_are_rejected_in_the_model_section(tmp_path: Path, field: str, value: object,
                                                             flag: str) -> None:
    tree = yaml.safe_load(EXAMPLE.read_text())
    tree["model"]["language"]["transformer"][field] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as raised:
        parse_run_config(["--config", str(path)], world_size=1)
    assert raised.value.problems == [
        f"config.model.language.transformer.{field}: not a model setting; set it with the training flag {flag}"
    ]


def test_position_embedding_none_is_rejected() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_run_config(["--config", str(EXAMPLE), "--set", "model.language.transformer.position_embedding=none"],
                         world_size=1)
    assert "config.model.language.transformer.position_embedding: expected one of 'rope', 'learned'" in str(
        raised.value)


def test_config_files_merge_field_by_field(tmp_path: Path) -> None:
    tree = yaml.safe_load(EXAMPLE.read_text())
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model": tree["model"]}))
    (tmp_path / "training.yaml").write_text(yaml.safe_dump({"training": tree["training"]}))
    (tmp_path / "short.yaml").write_text(yaml.safe_dump({"training": {"train_iters": 70}}))
    files = [part for name in ("training", "model", "short") for part in ("--config", str(tmp_path / f"{name}.yaml"))]
    config = parse_run_config(files, world_size=1)
    whole = parse_run_config(["--config", str(EXAMPLE)], world_size=1)
    assert config.model == whole.model
    assert config.training.train_iters == 70 and config.training.lr == whole.training.lr == 3e-3


def test_context_parallel_flag_and_its_problems() -> None:
    """--context-parallel-size splits the world (tp x cp x pp per replica) and the sequence (2 x cp
    chunks, each rank's share over tp under SP); what ring attention lacks is refused up front."""
    config = parse_run_config(["--config", str(EXAMPLE), "--context-parallel-size", "2", "--micro-batch-size", "2"],
                              world_size=4)
    resolved = resolve(config, 4)
    assert config.parallel.context_parallel_size == 2
    assert resolved.data_parallel_size == 2 and resolved.microbatches_per_step == 4  # 16 / (2 x dp 2)
    with pytest.raises(ConfigError) as raised:
        parse_run_config(
            ["--config", str(EXAMPLE), "--context-parallel-size", "3", "--tensor-model-parallel-size", "2",
             "--sequence-parallel",
             "--set", "model.language.transformer.attention_dropout=0.1"],
            world_size=8,
        )
    joined = "\n".join(raised.value.problems)
    for expected in (
        "world size 8 not divisible by tensor (2) x context (3) x pipeline (1) parallel sizes",
        "sequence length 64 not divisible by 2 x context-parallel size 3 = 6",
        "language.attention_dropout 0.1: ring attention (context-parallel size 3) has no attention dropout",
    ):
        assert expected in joined, f"{expected!r} not in:\n{joined}"
    with pytest.raises(ConfigError, match="each context-parallel rank's 36 tokens not divisible by "
                                          "tensor-model-parallel size 8"):
        parse_run_config(["--config", str(EXAMPLE), "--context-parallel-size", "2", "--tensor-model-parallel-size",
                          "8", "--sequence-parallel", "--seq-length", "72", "--micro-batch-size", "1",
                          "--global-batch-size", "1", "--set", "model.language.transformer.num_query_groups=8",
                          "--set", "model.vision.transformer.num_attention_heads=8"], world_size=16)
