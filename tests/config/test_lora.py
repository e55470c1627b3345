"""LoRA flags: parsed into one LoraConfig, every problem listed up front, freezing follows the targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from megamm.config import ConfigError
from megamm.config.lora import DEFAULT_TARGETS
from megamm.config.parsing import parse_run_config, read_run_config
from megamm.config.resolved import resolve

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml"


def _problems(*flags: str) -> list[str]:
    _, problems = read_run_config(["--config", str(EXAMPLE), *flags], world_size=1)
    return problems


def test_lora_flags_resolve_and_freeze_the_targeted_parts() -> None:
    run = parse_run_config(["--config", str(EXAMPLE), "--lora-rank", "8", "--lora-alpha", "32",
                            "--lora-dropout", "0.1", "--lora-target-modules", "q_proj,v_proj", "vision",
                            "--lora-use-dora"], world_size=1)
    config = resolve(run, 1)
    assert config.lora.targets == ("q_proj", "v_proj", "vision")
    assert config.lora.scale == 4.0 and config.lora.dropout == 0.1 and config.lora.dora
    # Parts holding targets freeze their base; the untargeted projector follows its flag (trains).
    assert config.model.freeze_language and config.model.freeze_vision and not config.model.freeze_projector
    # The model section as written is what a checkpoint saves: untouched.
    assert not run.model.freeze_language


def test_lora_defaults_every_decoder_linear_at_scale_one() -> None:
    config = resolve(parse_run_config(["--config", str(EXAMPLE), "--lora-rank", "4"], world_size=1), 1)
    assert config.lora.targets == DEFAULT_TARGETS and config.lora.scale == 1.0
    assert config.model.freeze_language and not config.model.freeze_vision
    assert resolve(parse_run_config(["--config", str(EXAMPLE)], world_size=1), 1).lora is None


def test_every_lora_problem_is_listed_at_once() -> None:
    problems = _problems("--lora-rank", "0", "--lora-alpha", "-1", "--lora-dropout", "1",
                         "--lora-target-modules", "q_proj,lm_head", "--no-freeze-LM", "--micro-batch-size", "0")
    text = "\n".join(problems)
    for expected in ("--lora-rank must be >= 1, got 0", "--lora-alpha must be > 0, got -1.0",
                     "--lora-dropout must be in [0, 1), got 1.0", "unknown 'lm_head'",
                     "--freeze-LM is off, but --lora-target-modules puts adapters in the language model",
                     "--micro-batch-size must be >= 1"):
        assert expected in text, (expected, problems)


def test_lora_flags_without_a_rank_are_refused() -> None:
    problems = _problems("--lora-alpha", "16", "--lora-use-dora", "--pretrained-checkpoint", "/nowhere")
    assert "--lora-alpha needs --lora-rank" in problems
    assert "--lora-use-dora needs --lora-rank" in problems
    assert "--pretrained-checkpoint needs --lora-rank" in problems


def test_swiglu_parts_need_a_gated_decoder() -> None:
    problems = _problems("--lora-rank", "4", "--lora-target-modules", "gate_proj",
                         "--set", "model.language.transformer.activation=gelu")
    assert any("gate_proj / up_proj are parts of a SwiGLU MLP" in p for p in problems), problems
    with pytest.raises(ConfigError):
        parse_run_config(["--config", str(EXAMPLE), "--lora-rank", "4", "--lora-target-modules", ","], world_size=1)
