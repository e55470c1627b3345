"""Training-flag checks of megamm.config.run that are not about batch arithmetic: the
native-resolution data flags and their tower, LLaVA-OneVision's frame count, the Weights & Biases flags; each problem is reported
up front, naming the flag."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest

from megamm.config.anyres import AnyResConfig
from megamm.config.model import NativeResolutionConfig, ParallelConfig
from megamm.config.parsing import parse_run_config, read_run_config
from megamm.config.run import RunConfig, TrainingConfig
from tests.tiny import llava_config, native_vision_config

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml")


def _problems(model, **training) -> list[str]:
    return RunConfig(model=model, training=TrainingConfig(**training)).problems(1)


def test_native_flags_need_a_native_tower() -> None:
    problems = _problems(llava_config(), mock_data=True, min_pixels=100, video_fps=1.0)
    assert ("--min-pixels, --video-fps: for a native-resolution vision tower (vision.native_resolution); the "
            "clip tower takes images of vision.image_size 16") in problems


def test_onevision_takes_video_max_frames_as_its_frame_count() -> None:
    """LLaVA-OneVision (anyres + a video token) takes --video-max-frames as the frames of every video
    (default 32, at least 1); its other video flags and the flag without a video token stay refused."""
    anyres = replace(llava_config(), anyres=AnyResConfig(((16, 32), (32, 16))))
    onevision = replace(anyres, language=replace(anyres.language, video_token_id=5))
    assert not [p for p in _problems(onevision, mock_data=True, video_max_frames=8) if "frames" in p]
    assert TrainingConfig(video_max_frames=8).anyres_video_frames == 8
    assert TrainingConfig().anyres_video_frames == 32
    assert ("--video-max-frames 0: LLaVA-OneVision takes that many frames from every video; give at least 1"
            in _problems(onevision, mock_data=True, video_max_frames=0))
    assert ("--video-fps: for a native-resolution vision tower (vision.native_resolution); the clip tower takes "
            "images of vision.image_size 16") in _problems(onevision, mock_data=True, video_fps=1.0, video_max_frames=8)
    assert ("--video-max-frames: for a native-resolution vision tower (vision.native_resolution); the clip tower "
            "takes images of vision.image_size 16") in _problems(anyres, mock_data=True, video_max_frames=8)


def test_a_native_tower_needs_its_template_and_sane_flags(tmp_path) -> None:
    native = llava_config(vision=native_vision_config())
    problems = _problems(native, data_path=[str(tmp_path)], tokenizer_model=str(tmp_path), chat_template="chatml",
                         max_image_tiles=4, image_normalization="siglip", min_pixels=5000, max_pixels=4000,
                         video_max_frames=1)
    for expected in (
        "--min-pixels 5000 is larger than --max-pixels 4000",
        "--video-max-frames 1 is below one temporal patch (vision.native_resolution.temporal_patch_size 2)",
        ("--chat-template chatml: a native-resolution vision tower (qwen2_vl) needs qwen2_vl (its vision start / "
         "end markers delimit each image and video)"),
        ("--max-image-tiles 4: a native-resolution vision tower takes each image whole at its own resolution, "
         "not tiled"),
        "--image-normalization siglip: a native-resolution vision tower normalizes with its own (CLIP) statistics",
    ):
        assert expected in problems, (expected, problems)
    assert "--video-min-pixels must be positive, got -3" in _problems(native, mock_data=True, video_min_pixels=-3)
    fine = _problems(native, data_path=[str(tmp_path)], tokenizer_model=str(tmp_path), chat_template="qwen2_vl",
                     video_max_pixels=28 * 28 * 256, balance_vision_work=True)  # its samples are probed by grid
    assert not [p for p in fine if "pixels" in p or "template" in p or "frames" in p or "balance" in p], fine


def test_native_flags_parse_and_tokens_per_second_is_checked() -> None:
    config, _ = read_run_config(["--config", EXAMPLE, "--mock-data", "--max-pixels", "12544", "--video-fps", "0.5",
                                        "--video-max-frames", "16"], 1)
    assert config.training.image_pixel_range == (56 * 56, 12544)
    assert config.training.video_sampling == (0.5, 16)
    assert config.training.video_pixel_range == (128 * 28 * 28, 28 * 28 * 768)  # Qwen2-VL's video processor
    vision = native_vision_config()
    broken = replace(vision, native_resolution=replace(vision.native_resolution, tokens_per_second=0.0))
    assert isinstance(vision.native_resolution, NativeResolutionConfig)
    assert ("vision.native_resolution.tokens_per_second must be positive (or null), got 0.0"
            in broken.problems(ParallelConfig()))


def _flag_problems(*flags: str, world_size: int = 1) -> list[str]:
    from megamm.config import ConfigError

    try:
        parse_run_config(["--config", EXAMPLE, *flags], world_size)
    except ConfigError as error:
        return error.problems
    return []


def test_wandb_flags_as_megatron_decides_them(tmp_path: Path) -> None:
    assert _flag_problems("--wandb-exp-name", "a", "--wandb-save-dir", str(tmp_path)) == [
        "--wandb-exp-name needs --wandb-project", "--wandb-save-dir needs --wandb-project"]
    assert _flag_problems("--wandb-project", "p") == [
        "--wandb-project needs --wandb-exp-name (the run's name)",
        "--wandb-project needs --wandb-save-dir or --save (the run directory defaults to <--save>/wandb)",
    ]
    assert _flag_problems("--wandb-project", "p", "--wandb-exp-name", "a", "--save", str(tmp_path)) == []
    assert _flag_problems("--wandb-project", "p", "--wandb-exp-name", "a", "--wandb-save-dir", str(tmp_path)) == []


def test_the_wandb_directory_defaults_to_the_save_directory(tmp_path: Path) -> None:
    assert TrainingConfig(wandb_project="p", save=str(tmp_path)).wandb_dir == str(tmp_path / "wandb")
    assert TrainingConfig(wandb_project="p", save="s", wandb_save_dir="w").wandb_dir == "w"
    assert TrainingConfig(save="s").wandb_dir is None


def test_a_missing_wandb_package_names_the_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert _flag_problems("--wandb-project", "p", "--wandb-exp-name", "a", "--save", str(tmp_path)) == [
        "--wandb-project needs the wandb package (pip install wandb, or megamm[wandb])"]


def test_balancing_vision_work_needs_dataset_files() -> None:
    assert _flag_problems("--balance-vision-work") == [
        "--balance-vision-work needs --data-path (it weighs the samples of dataset files)"]


def test_tile_tags_need_a_tagging_template_and_tiles() -> None:
    assert _flag_problems("--tile-tags") == [
        "--tile-tags: --chat-template llava_v1 has no tile tags; use internvl",
        "--tile-tags tags the tiles of dynamic tiling; --max-image-tiles is 1 (set it > 1)",
    ]
    assert _flag_problems("--tile-tags", "--chat-template", "internvl", "--max-image-tiles", "6") == []
