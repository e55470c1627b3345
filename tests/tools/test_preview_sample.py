"""tools/preview_sample.py for a native-resolution (Qwen2-VL family) model: each image's and video's
(t, h, w) grid, patches and tokens, taken from the run config's model and training sections."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from megamm.config.parsing import run_config_to_dict
from megamm.config.run import RunConfig, TrainingConfig
from tests.data.test_native_samples import full_row, write_native_files
from tests.tiny import llava_config, native_vision_config

ROOT = Path(__file__).resolve().parents[2]
qwen2_vl_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")


def test_preview_shows_grids_patches_and_tokens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_native_files(tmp_path)
    (root / "rows.jsonl").write_text(json.dumps(full_row()) + "\n")
    pixels = {"min_pixels": 256, "max_pixels": 2560, "video_min_pixels": 256, "video_max_pixels": 768}
    run = RunConfig(model=llava_config(vision=native_vision_config()), training=TrainingConfig(
        data_path=[str(root / "rows.jsonl")], image_folder=str(root), tokenizer_model=str(root / "tokenizer.json"),
        chat_template="qwen2_vl", seq_length=512, **pixels))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config_to_dict(run)))
    spec = importlib.util.spec_from_file_location("preview_sample", ROOT / "tools" / "preview_sample.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--config", str(tmp_path / "run.yaml"), "--index", "0"]) == 0
    out = capsys.readouterr().out
    # transformers' resize of the 40x90 and 100x31 images to multiples of 8 (4-pixel patches, 2x2 merge).
    for number, (height, width) in enumerate([(40, 90), (100, 31)]):
        h, w = (side // 4 for side in qwen2_vl_pil.smart_resize(height, width, 8, 256, 2560))
        assert f"image {number}: tokens [" in out
        assert f"grid (t, h, w) = (1, {h}, {w}), {h * w} patches, {h * w // 4} tokens" in out, out
        assert f"<image x {h * w // 4}>" in out
    # 12 frames at 4 per second sampled at 2 per second: 6 frames, 3 temporal patches of 1 s; 48x64 frames
    # at most 768 pixels: 24x32, so 6x8 patches.
    assert "video 0: tokens [" in out and "grid (t, h, w) = (3, 6, 8), 144 patches, 36 tokens, 1 s per temporal patch" in out
    assert "<video x 36>" in out and "[[The first one, clearly.<|im_end|>]]" in out


def test_preview_shows_anyres_tiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An any-resolution (LLaVA-NeXT) model's config: each image's tile grid, tower inputs (base image +
    tiles), size and token run, as megamm.config.anyres counts them."""
    from dataclasses import replace

    from megamm.config.anyres import AnyResConfig, image_tokens, tile_grid
    from tests.data_fixtures import model_for, write_dataset

    files = write_dataset(tmp_path / "data", rows=6)
    pinpoints = ((16, 32), (32, 16), (32, 32), (48, 16), (16, 48))
    model = replace(model_for(files.tokenizer), anyres=AnyResConfig(pinpoints))
    run = RunConfig(model=model, training=TrainingConfig(
        data_path=[str(files.train)], image_folder=str(files.images), tokenizer_model=str(files.tokenizer),
        chat_template="plain", seq_length=256))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config_to_dict(run)))
    spec = importlib.util.spec_from_file_location("preview_sample", ROOT / "tools" / "preview_sample.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--config", str(tmp_path / "run.yaml"), "--index", "0"]) == 0
    out = capsys.readouterr().out
    from PIL import Image

    with Image.open(files.images / "img0.png") as img:
        size = (img.height, img.width)
    rows, cols = tile_grid(size, list(pinpoints), 16)
    tokens = image_tokens(size, list(pinpoints), 16, 4)
    assert f"{rows * cols + 1} tower input(s), tile grid {cols}x{rows} (base image + tiles; image " \
           f"{size[0]}x{size[1]}, height x width)" in out, out
    assert f"<image x {tokens}>" in out
