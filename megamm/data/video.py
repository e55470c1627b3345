"""Videos for the Qwen2-VL family: frames read, sampled at a set rate, turned into 3D patches.

A video is either a list of frame image files (extracted beforehand at a known `frame_rate`) or a
video file, decoded with PyAV (`pip install "megamm[video]"`); only the file path needs PyAV.

Sampling follows transformers' `Qwen2VLVideoProcessor.sample_frames` with `fps`: the video's
duration times `fps` frames, at least `min_frames`, at most `max_frames` and the frames there are,
rounded down to a multiple of `temporal_patch_size`, taken at evenly spaced indices. Pairs of
consecutive sampled frames (with the default `temporal_patch_size` 2) form one temporal patch, so the
grid is (frames / 2, h, w) with the image processor's patch order (`native_resolution.patchify`).
`second_per_grid` (seconds per temporal patch: `temporal_patch_size` over the rate of the sampled
frames, `sampled_rate`) is what Qwen2.5-VL's M-RoPE uses to space the temporal positions
(`megamm.data.mrope`).

Frames are resized as `native_resolution` resizes images (Pillow bicubic, one size for the whole
video from the first frame's). transformers' video processor resizes with torchvision instead, which
can differ by a few 8-bit levels per pixel; the grid and the patch layout are the same.
`megamm.data.native_samples` calls them for the videos of a training sample.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from megamm.config.constants import VIDEO_MAX_FRAMES
from megamm.data.images import load_image
from megamm.data.native_resolution import (
    VIDEO_RESOLUTION,
    NativeResolution,
    VisionInput,
    patchify,
    resize_and_normalize,
    smart_resize,
)

# transformers' Qwen2VLVideoProcessor defaults (qwen-vl-utils uses the same bounds).
MIN_FRAMES = 4
MAX_FRAMES = VIDEO_MAX_FRAMES


@dataclass(frozen=True)
class VideoInput(VisionInput):
    """A video's patches and grid (see VisionInput) and `second_per_grid`: seconds per temporal patch."""

    second_per_grid: float


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    fps: float,
    temporal_patch_size: int,
    min_frames: int = MIN_FRAMES,
    max_frames: int = MAX_FRAMES,
) -> list[int]:
    """The indices of the frames sampled at `fps` from `total_frames` frames recorded at `video_fps`.

    transformers' `sample_frames(fps=...)`: `total / video_fps * fps` frames, clamped to
    [min_frames, min(max_frames, total)] (the upper bound first rounded down to a multiple of
    `temporal_patch_size`), rounded down to a multiple of it, at indices `arange(0, total, total / n)`
    truncated to integers. ValueError when the video has fewer frames than one temporal patch.
    """
    if total_frames < temporal_patch_size:
        raise ValueError(
            f"a video of {total_frames} frames has fewer than temporal_patch_size={temporal_patch_size}"
        )
    if video_fps <= 0 or fps <= 0:
        raise ValueError(f"frame rates must be positive, got video_fps={video_fps}, fps={fps}")
    upper = math.floor(min(max_frames, total_frames) / temporal_patch_size) * temporal_patch_size
    wanted = min(max(total_frames / video_fps * fps, min_frames), upper, total_frames)
    count = math.floor(wanted / temporal_patch_size) * temporal_patch_size
    if count < temporal_patch_size:
        raise ValueError(
            f"max_frames={max_frames} leaves fewer frames than temporal_patch_size={temporal_patch_size}"
        )
    # The same float arange as transformers, so the same indices (not a linspace: it never takes the last).
    return torch.arange(0, total_frames, total_frames / count).int().tolist()


def sampled_rate(num_sampled: int, total_frames: int, video_fps: float) -> float:
    """The frame rate of the sampled frames: `num_sampled / total_frames * video_fps`.

    It is the rate actually obtained (after the frame limits and rounding), not the one asked for;
    transformers derives Qwen2.5-VL's `second_per_grid_ts` from it (VideoMetadata.sampled_fps).
    """
    return num_sampled / total_frames * video_fps


def preprocess_video(
    frames: Sequence[Image.Image], fps: float, resolution: NativeResolution = VIDEO_RESOLUTION
) -> VideoInput:
    """Sampled RGB frames, `fps` of them per second of video -> patches `[t * h * w, patch_dim]`,
    grid and `second_per_grid = temporal_patch_size / fps`.

    All frames are resized to the size `smart_resize` gives the first; they must all have its size.
    A frame count that is not a multiple of `temporal_patch_size` is padded with copies of the last
    frame, as transformers' video processor does.
    """
    if not frames:
        raise ValueError("a video needs at least one frame")
    first = frames[0].size
    for index, frame in enumerate(frames):
        if frame.size != first:
            raise ValueError(f"video frame {index} is {frame.size} (width, height), frame 0 is {first}")
    size = smart_resize(frames[0].height, frames[0].width, resolution)
    stacked = torch.stack([resize_and_normalize(frame, size) for frame in frames])
    if pad := -len(frames) % resolution.temporal_patch_size:
        stacked = torch.cat([stacked, stacked[-1:].expand(pad, -1, -1, -1)])
    patches = patchify(stacked, resolution)
    return VideoInput(
        patches.pixel_values, patches.grid_thw, patches.num_tokens, resolution.temporal_patch_size / fps
    )


def load_frame_list(
    paths: Sequence[str | os.PathLike[str]],
    image_root: str | os.PathLike[str],
    frame_rate: float,
    fps: float,
    resolution: NativeResolution = VIDEO_RESOLUTION,
    max_frames: int = MAX_FRAMES,
) -> VideoInput:
    """A video given as frame files (taken at `frame_rate` per second), sampled at `fps`.

    Only the sampled frames are decoded, each with `load_image`'s checks (inside `image_root`,
    pixel limit, corrupt files raise ImageError naming the file).
    """
    indices = sample_frame_indices(
        len(paths), frame_rate, fps, resolution.temporal_patch_size, max_frames=max_frames
    )
    frames = [load_image(paths[index], image_root) for index in indices]
    return preprocess_video(frames, sampled_rate(len(indices), len(paths), frame_rate), resolution)


def _decode_video(path: Path) -> tuple[list[Image.Image], float]:
    """All frames of a video file as RGB images, and its average frame rate (PyAV)."""
    try:
        import av
    except ImportError as error:
        raise ImportError(
            f"cannot decode video {path}: reading video files needs the 'av' package (PyAV); "
            'install it with `pip install "megamm[video]"`, or give the video as a list of frame files'
        ) from error
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"video {path}: the file has no video stream")
            stream = container.streams.video[0]
            if stream.average_rate is None:
                raise ValueError(f"video {path}: the stream has no frame rate")
            frame_rate = float(stream.average_rate)
            frames = [frame.to_image().convert("RGB") for frame in container.decode(stream)]
    except av.error.FFmpegError as error:  # a corrupt or truncated file: a bad sample, not a crash
        raise ValueError(f"video {path} cannot be decoded: {error}") from error
    return frames, frame_rate


def load_video_file(
    path: str | os.PathLike[str],
    fps: float,
    resolution: NativeResolution = VIDEO_RESOLUTION,
    max_frames: int = MAX_FRAMES,
) -> VideoInput:
    """A video file decoded with PyAV, sampled at `fps`; ImportError naming the file without PyAV.

    Every frame is decoded (the frame count of a container header is not reliable) and the sampled
    ones are kept, so memory grows with the video's length; long videos are better extracted to
    frame files first.
    """
    frames, frame_rate = _decode_video(Path(path))
    indices = sample_frame_indices(
        len(frames), frame_rate, fps, resolution.temporal_patch_size, max_frames=max_frames
    )
    rate = sampled_rate(len(indices), len(frames), frame_rate)
    return preprocess_video([frames[index] for index in indices], rate, resolution)


__all__ = [
    "MAX_FRAMES",
    "MIN_FRAMES",
    "VideoInput",
    "load_frame_list",
    "load_video_file",
    "preprocess_video",
    "sample_frame_indices",
    "sampled_rate",
]
