"""megamm.data.video: frame sampling (hand-computed cases of transformers' rule), the temporal patch
layout (by construction against the image path, and by hand), frame lists, and video files.

transformers' Qwen2VLVideoProcessor imports torchvision, which this environment lacks, so its rule is
checked on worked examples instead: n = total / video_fps * fps, clamped to
[min_frames, floor(min(max_frames, total) / 2) * 2], floored to a multiple of 2, indices
int(k * total / n).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megamm.models.towers.clip import CLIP

CLIP_MEAN, CLIP_STD = CLIP.image_mean, CLIP.image_std
from megamm.data.native_resolution import NativeResolution, preprocess_image
from megamm.data.video import (
    VideoHeader,
    frame_list_grid,
    load_frame_bytes,
    load_frame_list,
    load_video_bytes,
    load_video_file,
    preprocess_video,
    read_video_header,
    sample_frame_indices,
    sampled_rate,
    video_file_grid,
)
from tests.data_fixtures import write_mp4

SMALL = NativeResolution(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 6)


@pytest.mark.parametrize(
    ("total", "video_fps", "fps", "max_frames", "expected"),
    [
        (30, 30.0, 2.0, 768, [0, 7, 15, 22]),  # 2 frames asked, min_frames 4: step 7.5
        (100, 10.0, 2.0, 768, list(range(0, 100, 5))),  # 10 s at 2 fps: 20 frames, step 5
        (9, 1.0, 2.0, 768, list(range(8))),  # 18 asked, 9 there, floored to 8: step 1.125
        (100, 10.0, 2.0, 7, [0, 16, 33, 50, 66, 83]),  # max_frames 7 floored to 6: step 16.67
        (50, 25.0, 3.0, 768, [0, 8, 16, 25, 33, 41]),  # 2 s at 3 fps: 6 frames, step 8.33
    ],
)
def test_sample_frame_indices(
    total: int, video_fps: float, fps: float, max_frames: int, expected: list[int]
) -> None:
    assert sample_frame_indices(total, video_fps, fps, 2, max_frames=max_frames) == expected


def test_sample_frame_indices_errors() -> None:
    with pytest.raises(ValueError, match="1 frames has fewer than temporal_patch_size=2"):
        sample_frame_indices(1, 30.0, 2.0, 2)
    with pytest.raises(ValueError, match="max_frames=1 leaves fewer frames"):
        sample_frame_indices(10, 30.0, 2.0, 2, max_frames=1)
    with pytest.raises(ValueError, match="must be positive"):
        sample_frame_indices(10, 0.0, 2.0, 2)


def test_sampled_rate() -> None:
    assert sampled_rate(4, 30, 30.0) == 4.0  # min_frames forced 4 frames from 1 s: 4 per second
    assert sampled_rate(20, 100, 10.0) == 2.0


def random_frame(seed: int, size: tuple[int, int] = (50, 70)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def test_still_video_equals_the_image() -> None:
    """A two-frame video of one image is exactly the image's input: the image processor repeats the
    image temporal_patch_size times, the video processor takes the two frames as one temporal patch."""
    frame = random_frame(0)
    video = preprocess_video([frame, frame], fps=2.0, resolution=SMALL)
    image = preprocess_image(frame, SMALL)
    assert video.grid_thw == image.grid_thw
    assert video.num_tokens == image.num_tokens
    assert torch.equal(video.pixel_values, image.pixel_values)
    assert video.second_per_grid == 1.0  # 2 frames per patch at 2 frames per second


def solid(value: int) -> Image.Image:
    return Image.new("RGB", (56, 56), (value, value, value))


def test_temporal_pairs_by_hand() -> None:
    """Frames 2k and 2k+1 are temporal patch k (patches [k*h*w, (k+1)*h*w)), frame 2k in slot 0 of
    every patch; an odd count is padded with the last frame."""
    values = [0, 60, 120, 180, 240]  # five solid frames: padded to six, the last one twice
    video = preprocess_video([solid(v) for v in values], fps=4.0, resolution=NativeResolution(min_pixels=1))
    assert video.grid_thw == (3, 4, 4)
    assert video.num_tokens == 3 * 4 * 4 // 4
    assert video.second_per_grid == 0.5
    frames_of_patch = video.pixel_values.reshape(3, 16, 3, 2, 14, 14)  # [t, h*w, channel, frame, row, col]
    padded = [*values, values[-1]]
    for t in range(3):
        for slot in range(2):
            value = padded[2 * t + slot]
            for channel in range(3):
                expected = (value / 255 - CLIP_MEAN[channel]) / CLIP_STD[channel]
                got = frames_of_patch[t, :, channel, slot]
                torch.testing.assert_close(got, torch.full_like(got, expected), rtol=0, atol=1e-5)


def test_frames_must_share_a_size() -> None:
    with pytest.raises(ValueError, match=r"video frame 1 is \(70, 40\)"):
        preprocess_video([random_frame(0), random_frame(1, (40, 70))], fps=2.0, resolution=SMALL)


def test_frame_list(tmp_path: Path) -> None:
    """Twelve frame files taken at 4 per second, sampled at 2 per second: frames 0, 2, ..., 10."""
    frames = [random_frame(seed) for seed in range(12)]
    paths = []
    for index, frame in enumerate(frames):
        frame.save(tmp_path / f"frame_{index:02d}.png")
        paths.append(f"frame_{index:02d}.png")
    video = load_frame_list(paths, tmp_path, frame_rate=4.0, fps=2.0, resolution=SMALL)
    expected = preprocess_video([frames[i] for i in range(0, 12, 2)], fps=2.0, resolution=SMALL)
    assert video.grid_thw == expected.grid_thw
    assert video.grid_thw[0] == 3
    assert torch.equal(video.pixel_values, expected.pixel_values)
    assert video.second_per_grid == 1.0
    # Six frames (1.5 s) give only 3 at 2 fps; min_frames makes it 4, so the frames are 4 / 1.5 s apart
    # in time and a temporal patch spans 2 / (4 / 1.5) = 0.75 s, not the 1 s that fps alone implies.
    short = load_frame_list(paths[:6], tmp_path, frame_rate=4.0, fps=2.0, resolution=SMALL)
    assert short.grid_thw[0] == 2
    assert short.second_per_grid == pytest.approx(0.75)
    # The same frames held in memory (tar members, table cells), and the grid from the first frame's size.
    encoded = [(tmp_path / path).read_bytes() for path in paths]
    in_memory = load_frame_bytes(encoded, paths, frame_rate=4.0, fps=2.0, resolution=SMALL)
    assert torch.equal(in_memory.pixel_values, video.pixel_values) and in_memory.grid_thw == video.grid_thw
    assert in_memory.second_per_grid == video.second_per_grid
    assert frame_list_grid(12, frames[0].size, 4.0, 2.0, SMALL) == video.grid_thw
    assert frame_list_grid(6, frames[0].size, 4.0, 2.0, SMALL) == short.grid_thw


def test_video_file_without_pyav(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    path = tmp_path / "clip.mp4"
    with pytest.raises(ImportError, match=r"clip\.mp4.*'av' package \(PyAV\).*megamm\[video\]"):
        load_video_file(path, fps=2.0)


def test_video_file_with_pyav(tmp_path: Path) -> None:
    """Runs where PyAV is installed (the "video" extra): a 2-second 8 fps clip sampled at 2 fps."""
    pytest.importorskip("av")
    path = write_mp4(tmp_path / "clip.mp4", [random_frame(seed, (48, 64)) for seed in range(16)], rate=8)
    video = load_video_file(path, fps=2.0, resolution=SMALL)
    assert video.grid_thw[0] == 2  # 4 frames sampled, 2 temporal patches
    assert video.second_per_grid == 1.0
    # The encoded file in memory decodes alike; its header (no frame decoded) gives the same grid.
    in_memory = load_video_bytes(path.read_bytes(), "shard.tar:clip.mp4", fps=2.0, resolution=SMALL)
    assert torch.equal(in_memory.pixel_values, video.pixel_values) and in_memory.grid_thw == video.grid_thw
    assert read_video_header(path, "clip.mp4") == VideoHeader(16, 8.0, 64, 48)
    assert video_file_grid(path.read_bytes(), "clip.mp4", fps=2.0, resolution=SMALL) == video.grid_thw
    # 2 s at 6 fps: 12 frames, 6 temporal patches; 48x64 rounds to 56x56 (2 x 28 per side): 4x4 patches.
    assert video_file_grid(path, "clip.mp4", fps=6.0, resolution=SMALL) == (6, 4, 4)
    with pytest.raises(ValueError, match="video shard.tar:broken.mp4 cannot be"):
        load_video_bytes(b"not a video", "shard.tar:broken.mp4", fps=2.0, resolution=SMALL)
    with pytest.raises(ValueError, match="video broken.mp4 cannot be read"):
        read_video_header(b"not a video", "broken.mp4")
