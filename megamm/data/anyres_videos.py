"""LLaVA-OneVision's videos for training samples: frames taken from a record's videos, each one tile.

transformers' LLaVA-OneVision model takes `pixel_values_videos [videos, frames, C, H, W]`, one frame
count for the whole batch. megamm therefore takes the same number of frames from every video of a
run (`VideoSettings.frames`, from --video-max-frames: `TrainingConfig.anyres_video_frames`), evenly
spaced over the video (`megamm.data.video.fixed_frame_indices`, transformers' `sample_frames` with
`num_frames`), so the videos of any microbatch stack; a video with fewer frames is a bad sample
("video"), as transformers' sampler refuses it. Each frame is squashed to the tower's tile (Pillow
bicubic), rescaled and normalized with the images' statistics (`megamm.data.images.preprocess`,
"resize"): LlavaOnevisionVideoProcessor's steps. A video gives
`megamm.config.anyres.video_tokens(frames, grid)` tokens (its placeholder's expansion).

Videos come as in `megamm.data.native_samples`: a video file (PyAV) or a list of frame files, on disk
(JSON rows: resolved paths) or in memory (`Record.video_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from megamm.data.images import Normalization, preprocess
from megamm.data.sources import Record
from megamm.data.video import fixed_file_frames, fixed_frame_indices, fixed_list_frames, read_video_header


@dataclass(frozen=True)
class VideoSettings:
    """LLaVA-OneVision videos: `frames` taken from every video, its tokens `token_id`
    (`language.video_token_id`)."""

    frames: int
    token_id: int

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"need at least one frame per video, got {self.frames}")


def _name(record: Record, number: int) -> str:
    """Video `number` of `record` in errors."""
    video = record.videos[number]
    return video if isinstance(video, str) else f"of {len(video)} frames from {video[0]!r}"


def record_video_frames(record: Record, number: int, frames: int) -> list[Image.Image]:
    """The `frames` RGB frames taken from video `number` of `record` (its bytes or its resolved
    files); ValueError (ImageError for a frame file) or OSError when it cannot be used."""
    video = record.videos[number]
    if isinstance(video, str):
        source = Path(video) if record.video_bytes is None else record.video_bytes[number]
        name = video if record.video_bytes is None else f"{record.source}:{video}"
        return fixed_file_frames(source, name, frames)
    if record.video_bytes is None:
        return fixed_list_frames(video, [repr(frame) for frame in video], frames)
    return fixed_list_frames(record.video_bytes[number], [f"{record.source}:{frame}" for frame in video], frames)


def check_video_length(record: Record, number: int, frames: int) -> None:
    """ValueError when video `number` of `record` has fewer than `frames` frames, read from a frame
    list's length or a video file's container header (no frame decoded; the probe)."""
    video = record.videos[number]
    if isinstance(video, str):
        source = Path(video) if record.video_bytes is None else record.video_bytes[number]
        name = video if record.video_bytes is None else f"{record.source}:{video}"
        total = read_video_header(source, name).frames
    else:
        total = len(video)
    fixed_frame_indices(total, frames)


def frame_pixels(frames: list[Image.Image], tile: int, normalization: Normalization) -> torch.Tensor:
    """Frames -> `[frames, 3, tile, tile]` float32, each squashed to the tile and normalized."""
    return torch.stack([preprocess(frame, tile, "resize", normalization) for frame in frames])


def record_videos(record: Record, settings: VideoSettings, tile: int, normalization: Normalization) -> list[torch.Tensor]:
    """`[frames, 3, tile, tile]` of each video of `record`; ValueError naming the video when one
    cannot be used."""
    videos = []
    for number in range(len(record.videos)):
        try:
            videos.append(frame_pixels(record_video_frames(record, number, settings.frames), tile, normalization))
        except (ValueError, OSError) as error:  # ImageError (a frame file) is a ValueError
            raise ValueError(f"video {number} {_name(record, number)}: {error}") from None
    return videos


def check_video_lengths(record: Record, settings: VideoSettings) -> None:
    """`check_video_length` of every video of `record`, ValueError naming the video."""
    for number in range(len(record.videos)):
        try:
            check_video_length(record, number, settings.frames)
        except (ValueError, OSError) as error:
            raise ValueError(f"video {number} {_name(record, number)}: {error}") from None


__all__ = ["VideoSettings", "check_video_lengths", "frame_pixels", "record_video_frames", "record_videos"]
