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

LLaVA-OneVision takes the same number of frames from every video instead (`fixed_frame_indices`: this
rule with the count fixed; `fixed_file_frames`, `fixed_list_frames` read just those frames), for
`megamm.data.anyres_videos`.

Frames are resized as `native_resolution` resizes images (Pillow bicubic, one size for the whole
video from the first frame's). transformers' video processor resizes with torchvision instead, which
can differ by a few 8-bit levels per pixel; the grid and the patch layout are the same.
`megamm.data.native_samples` calls them for the videos of a training sample.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from megamm.config.constants import VIDEO_MAX_FRAMES
from megamm.data.images import load_image, load_image_bytes
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


def fixed_frame_indices(total_frames: int, frames: int) -> list[int]:
    """The indices of exactly `frames` frames evenly spaced over a video of `total_frames`: the same
    rule with the count fixed (transformers' `sample_frames(num_frames=frames)`, which LLaVA-OneVision's
    video processor takes); ValueError naming both counts when the video is shorter."""
    if total_frames < frames:
        raise ValueError(f"it has {total_frames} frames, fewer than the {frames} taken from every video")
    # The rate terms cancel (min_frames = max_frames = frames): the count is `frames`.
    return sample_frame_indices(total_frames, 1.0, 1.0, 1, min_frames=frames, max_frames=frames)


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


def video_grid(num_frames: int, height: int, width: int, resolution: NativeResolution) -> tuple[int, int, int]:
    """The (t, h, w) patch grid `preprocess_video` gives `num_frames` sampled frames of `height x
    width`, from the counts alone (the probe, megamm.data.balance); the frames are padded to a
    multiple of `temporal_patch_size` as `preprocess_video` pads them."""
    resized_height, resized_width = smart_resize(height, width, resolution)
    return (math.ceil(num_frames / resolution.temporal_patch_size), resized_height // resolution.patch_size,
            resized_width // resolution.patch_size)


def _load_sampled(
    num_frames: int,
    frame: Callable[[int], Image.Image],
    frame_rate: float,
    fps: float,
    resolution: NativeResolution,
    max_frames: int,
) -> VideoInput:
    """The frames of a video of `num_frames` (taken at `frame_rate` per second) sampled at `fps`;
    `frame(index)` gives one, so a reader of frame files decodes only the sampled ones."""
    indices = sample_frame_indices(num_frames, frame_rate, fps, resolution.temporal_patch_size, max_frames=max_frames)
    frames = [frame(index) for index in indices]
    return preprocess_video(frames, sampled_rate(len(indices), num_frames, frame_rate), resolution)


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
    return _load_sampled(len(paths), lambda index: load_image(paths[index], image_root), frame_rate, fps,
                         resolution, max_frames)


def load_frame_bytes(
    frames: Sequence[bytes],
    names: Sequence[str],
    frame_rate: float,
    fps: float,
    resolution: NativeResolution = VIDEO_RESOLUTION,
    max_frames: int = MAX_FRAMES,
) -> VideoInput:
    """`load_frame_list` for encoded frame images held in memory (tar members, Parquet cells); `names`
    name them in errors."""
    return _load_sampled(len(frames), lambda index: load_image_bytes(frames[index], names[index]), frame_rate,
                         fps, resolution, max_frames)


def frame_list_grid(
    num_frames: int,
    first_frame: tuple[int, int],
    frame_rate: float,
    fps: float,
    resolution: NativeResolution = VIDEO_RESOLUTION,
    max_frames: int = MAX_FRAMES,
) -> tuple[int, int, int]:
    """The grid `load_frame_list` / `load_frame_bytes` give a video of `num_frames` frames whose first
    frame is `first_frame` = (width, height): the first frame is always sampled and sets the size."""
    indices = sample_frame_indices(
        num_frames, frame_rate, fps, resolution.temporal_patch_size, max_frames=max_frames
    )
    width, height = first_frame
    return video_grid(len(indices), height, width, resolution)


VideoSource = Path | bytes


def _av(name: str) -> Any:
    """The PyAV module, or an ImportError naming the video and the extra to install."""
    try:
        import av
    except ImportError as error:
        raise ImportError(
            f"cannot decode video {name}: reading video files needs the 'av' package (PyAV); "
            'install it with `pip install "megamm[video]"`, or give the video as a list of frame files'
        ) from error
    return av


def _open_video(source: VideoSource, name: str) -> Any:
    """The PyAV container of a video file path or of an encoded video in memory."""
    av = _av(name)
    if isinstance(source, Path) and not source.is_file():
        raise FileNotFoundError(f"video file not found: {source}")
    return av.open(str(source) if isinstance(source, Path) else io.BytesIO(source))


def _video_stream(container: Any, name: str) -> Any:
    if not container.streams.video:
        raise ValueError(f"video {name}: the file has no video stream")
    stream = container.streams.video[0]
    if stream.average_rate is None:
        raise ValueError(f"video {name}: the stream has no frame rate")
    return stream


def _decode_video(source: VideoSource, name: str) -> tuple[list[Image.Image], float]:
    """All frames of a video as RGB images, and its average frame rate (PyAV)."""
    av = _av(name)
    try:
        with _open_video(source, name) as container:
            stream = _video_stream(container, name)
            frame_rate = float(stream.average_rate)
            frames = [frame.to_image().convert("RGB") for frame in container.decode(stream)]
    except av.error.FFmpegError as error:  # a corrupt or truncated file: a bad sample, not a crash
        raise ValueError(f"video {name} cannot be decoded: {error}") from error
    return frames, frame_rate


@dataclass(frozen=True)
class VideoHeader:
    """What a video file's container says without decoding a frame: frames, frames per second, size."""

    frames: int
    frame_rate: float
    width: int
    height: int


def read_video_header(source: VideoSource, name: str) -> VideoHeader:
    """The header of a video file path or of an encoded video in memory (PyAV), no frame decoded.

    The frame count is the stream's, or, when the container does not record one (0), the number of
    its non-empty packets, read without decoding. Either can differ from the frames a decode yields
    for a damaged file; the probe that uses it only weighs the sample (megamm.data.balance).
    """
    av = _av(name)
    try:
        with _open_video(source, name) as container:
            stream = _video_stream(container, name)
            frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            context = stream.codec_context
            return VideoHeader(frames, float(stream.average_rate), context.width, context.height)
    except av.error.FFmpegError as error:
        raise ValueError(f"video {name} cannot be read: {error}") from error




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
    frames, frame_rate = _decode_video(Path(path), os.fspath(path))
    return _load_sampled(len(frames), frames.__getitem__, frame_rate, fps, resolution, max_frames)


def load_video_bytes(
    data: bytes,
    name: str,
    fps: float,
    resolution: NativeResolution = VIDEO_RESOLUTION,
    max_frames: int = MAX_FRAMES,
) -> VideoInput:
    """`load_video_file` for an encoded video held in memory (a tar member, a Parquet cell); `name`
    names it in errors."""
    frames, frame_rate = _decode_video(data, name)
    return _load_sampled(len(frames), frames.__getitem__, frame_rate, fps, resolution, max_frames)


def frames_root(frames: Sequence[str]) -> str:
    """The folder a JSON row's resolved frame files are read under: their common directory."""
    return os.path.commonpath([os.path.dirname(frame) for frame in frames])


def fixed_file_frames(source: VideoSource, name: str, frames: int) -> list[Image.Image]:
    """`frames` RGB frames of a video file path or an encoded video in memory (`fixed_frame_indices`);
    every frame is decoded, as in `load_video_file`."""
    decoded, _ = _decode_video(source, name)
    return [decoded[index] for index in fixed_frame_indices(len(decoded), frames)]


def fixed_list_frames(frames: Sequence[str] | Sequence[bytes], names: Sequence[str],
                      frames_taken: int) -> list[Image.Image]:
    """`frames_taken` of a video given as frame files (resolved paths, read under their common
    folder) or as encoded frame images in memory, `names` naming them in errors; only the taken
    frames are decoded."""
    indices = fixed_frame_indices(len(frames), frames_taken)
    if frames and isinstance(frames[0], bytes):
        return [load_image_bytes(frames[index], names[index]) for index in indices]
    folder = frames_root(frames)
    return [load_image(frames[index], folder) for index in indices]


def video_file_grid(
    source: VideoSource,
    name: str,
    fps: float,
    resolution: NativeResolution = VIDEO_RESOLUTION,
    max_frames: int = MAX_FRAMES,
) -> tuple[int, int, int]:
    """The grid `load_video_file` / `load_video_bytes` give, from the header (`read_video_header`)."""
    header = read_video_header(source, name)
    indices = sample_frame_indices(
        header.frames, header.frame_rate, fps, resolution.temporal_patch_size, max_frames=max_frames
    )
    return video_grid(len(indices), header.height, header.width, resolution)


__all__ = [
    "MAX_FRAMES",
    "MIN_FRAMES",
    "VideoHeader",
    "VideoInput",
    "fixed_file_frames",
    "fixed_frame_indices",
    "fixed_list_frames",
    "frame_list_grid",
    "frames_root",
    "load_frame_bytes",
    "load_frame_list",
    "load_video_bytes",
    "load_video_file",
    "preprocess_video",
    "read_video_header",
    "sample_frame_indices",
    "sampled_rate",
    "video_file_grid",
    "video_grid",
]
