"""Training-flag checks of megamm.config.run that are not about batch arithmetic: each problem is
reported up front, naming the flag."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from megamm.config.parsing import parse_run_config
from megamm.config.run import TrainingConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "tiny_cpu.yaml")


def _problems(*flags: str, world_size: int = 1) -> list[str]:
    from megamm.config import ConfigError

    try:
        parse_run_config(["--config", EXAMPLE, *flags], world_size)
    except ConfigError as error:
        return error.problems
    return []


def test_wandb_flags_as_megatron_decides_them(tmp_path: Path) -> None:
    assert _problems("--wandb-exp-name", "a", "--wandb-save-dir", str(tmp_path)) == [
        "--wandb-exp-name needs --wandb-project", "--wandb-save-dir needs --wandb-project"]
    assert _problems("--wandb-project", "p") == [
        "--wandb-project needs --wandb-exp-name (the run's name)",
        "--wandb-project needs --wandb-save-dir or --save (the run directory defaults to <--save>/wandb)",
    ]
    assert _problems("--wandb-project", "p", "--wandb-exp-name", "a", "--save", str(tmp_path)) == []
    assert _problems("--wandb-project", "p", "--wandb-exp-name", "a", "--wandb-save-dir", str(tmp_path)) == []


def test_the_wandb_directory_defaults_to_the_save_directory(tmp_path: Path) -> None:
    assert TrainingConfig(wandb_project="p", save=str(tmp_path)).wandb_dir == str(tmp_path / "wandb")
    assert TrainingConfig(wandb_project="p", save="s", wandb_save_dir="w").wandb_dir == "w"
    assert TrainingConfig(save="s").wandb_dir is None


def test_a_missing_wandb_package_names_the_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert _problems("--wandb-project", "p", "--wandb-exp-name", "a", "--save", str(tmp_path)) == [
        "--wandb-project needs the wandb package (pip install wandb, or megamm[wandb])"]


def test_balancing_vision_work_needs_dataset_files() -> None:
    assert _problems("--balance-vision-work") == [
        "--balance-vision-work needs --data-path (it weighs the samples of dataset files)"]
