"""One raw `Record` -> one `Sample` for the native-resolution (Qwen2-VL) family: patches, grids, M-RoPE.

Each image is resized and cut into patches at its own resolution (`megamm.data.native_resolution`), each
video sampled and patched (`megamm.data.video`: frame files, or a video file through PyAV); their token
counts (`t * h * w / merge**2`, one per image or video) go to the `qwen2_vl` template, which renders the
conversation with each placeholder expanded to exactly that many pad tokens between
`<|vision_start|>` and `<|vision_end|>` (`megamm.data.qwen_template`). The M-RoPE positions of the
sample alone (`megamm.data.mrope`) are computed here, in the loader's workers, once per sample: the
batching places them (padded rows continue them over the padding, packed rows restart them per sample).

Truncation differs from the fixed-size families: a sample longer than the sequence length is cut in
its text only. A cut that would fall inside a vision span (its start marker through its end marker)
makes the sample `too_long` (skipped and counted): the model needs every token of an image it gets,
and moving the cut before the image would train on a different sample than the one written. Images
and videos wholly after the cut are dropped with their patches.

Videos come as files or frame lists, either on disk (JSON rows: resolved paths) or in memory (tar
members, table cells, Energon parts: `Record.video_bytes`); both decode through `megamm.data.video`
to the same patches. `probe` gives the counts `build` would (each image's and video's grid, the
tokens) from image headers, a frame list's first frame and a video file's container header, without
decoding, for --balance-vision-work (megamm.data.balance).

Bad input is `BadSample` as in `megamm.data.samples`: "image" (an image or a frame file),
"video" (a video that cannot be decoded, has too few frames, frames of different sizes, an aspect
ratio above 200), "schema", "all_masked", "too_long". A video file without PyAV installed is not a bad
sample but an ImportError naming the file and the package, since every video of the run would fail.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from megamm.config.constants import VIDEO_FPS
from megamm.data.images import DEFAULT_MAX_PIXELS, ImageError, image_size, resolve_image_path
from megamm.data.mrope import mrope_position_ids
from megamm.data.native_resolution import (
    VIDEO_RESOLUTION,
    NativeResolution,
    VisionInput,
    image_grid,
    num_vision_tokens,
    preprocess_image,
)
from megamm.data.qwen_template import VIDEO_PAD, Qwen2VLTemplate, QwenTokenized, render_qwen2_vl
from megamm.data.samples import NativeVision, Sample, SampleLayout, load_record_image, record_image_size
from megamm.data.sources import BadSample, Record
from megamm.data.templates import (
    AllLabelsMaskedError,
    ChatTemplate,
    check_trained_after_truncation,
    get_template,
)
from megamm.data.tokenizer import Tokenizer
from megamm.data.video import (
    MAX_FRAMES,
    VideoInput,
    frame_list_grid,
    frames_root,
    load_frame_bytes,
    load_frame_list,
    load_video_bytes,
    load_video_file,
    video_file_grid,
)

if TYPE_CHECKING:
    from megamm.config import VisionConfig
    from megamm.config.run import TrainingConfig


@dataclass(frozen=True)
class NativeSettings:
    """How a native-resolution sample's images and videos become patches, and their M-RoPE positions.

    image / video: the patch, merge and temporal sizes of the tower with the pixel range each is
    resized into (Qwen2-VL's processors allow videos fewer pixels per frame). fps / max_frames: the
    video sampling rate and frame limit. tokens_per_second: Qwen2.5-VL's temporal scaling of video
    positions (None: Qwen2-VL, one position per temporal patch). max_decoded_pixels: images (and
    frames) with more pixels are refused before decoding, as for the other families.
    """

    image: NativeResolution = field(default_factory=NativeResolution)
    video: NativeResolution = VIDEO_RESOLUTION
    fps: float = VIDEO_FPS
    max_frames: int = MAX_FRAMES
    tokens_per_second: float | None = None
    max_decoded_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        sizes = ("patch_size", "merge_size", "temporal_patch_size")
        if any(getattr(self.image, name) != getattr(self.video, name) for name in sizes):
            raise ValueError(f"images and videos go through one tower: their {', '.join(sizes)} must agree")
        if not self.fps > 0 or self.max_frames < self.image.temporal_patch_size:
            raise ValueError(f"need fps > 0 and max_frames >= temporal_patch_size, got {self.fps}, {self.max_frames}")

    @property
    def patch_dim(self) -> int:
        """Values per patch: 3 channels x temporal_patch_size frames x patch_size^2 pixels."""
        return 3 * self.image.temporal_patch_size * self.image.patch_size**2


def native_settings(vision: VisionConfig, training: TrainingConfig) -> NativeSettings:
    """How a run patches its images and videos: the tower's patch, merge and temporal sizes
    (`vision.native_resolution`), the pixel ranges and the video sampling of the training flags."""
    native = vision.native_resolution
    if native is None:
        raise ValueError(f"the {vision.family} tower is not a native-resolution one (no vision.native_resolution)")
    sizes = {"patch_size": vision.patch_size, "merge_size": native.spatial_merge_size,
             "temporal_patch_size": native.temporal_patch_size}
    (image_low, image_high), (video_low, video_high) = training.image_pixel_range, training.video_pixel_range
    fps, max_frames = training.video_sampling
    return NativeSettings(
        image=NativeResolution(**sizes, min_pixels=image_low, max_pixels=image_high),
        video=NativeResolution(**sizes, min_pixels=video_low, max_pixels=video_high),
        fps=fps, max_frames=max_frames, tokens_per_second=native.tokens_per_second,
    )


T = TypeVar("T")
U = TypeVar("U")


def load_video(
    video: str | os.PathLike[str] | list[str], frame_rate: float, settings: NativeSettings,
    root: str | os.PathLike[str] | None = None,
) -> VideoInput:
    """One video's patches and grid: a video file (PyAV) or its frame files in order, taken at
    `frame_rate` frames per second (a file's own rate is read from it), sampled at `settings.fps`.

    root: the directory the paths must resolve into (relative paths are relative to it); None takes
    the paths as given (a data source's, already resolved). ImageError for a frame file, ValueError or
    OSError for a video file that cannot be read; ImportError naming the file without PyAV.
    Training samples (`NativeSampleBuilder`) and generation prompts (`megamm.inference.session`) both
    read their videos here, so a prompt's video gets the patches training would have given it."""
    if isinstance(video, (str, os.PathLike)):
        path = video if root is None else resolve_image_path(video, root)
        return load_video_file(path, settings.fps, settings.video, settings.max_frames)
    folder = frames_root(video) if root is None else root
    return load_frame_list(video, folder, frame_rate, settings.fps, settings.video, settings.max_frames)


def vision_spans(tokenized: QwenTokenized) -> list[tuple[int, int]]:
    """[start, end) of every image and video with its `<|vision_start|>` and `<|vision_end|>` markers."""
    return sorted((start - 1, end + 1) for start, end in tokenized.image_spans + tokenized.video_spans)


class NativeSampleBuilder:
    """Turns records into samples for a native-resolution model: tokenizer, `qwen2_vl` template,
    patch settings and sequence length (the interface of `megamm.data.samples.SampleBuilder`)."""

    def __init__(
        self, tokenizer: Tokenizer, template: str | ChatTemplate, settings: NativeSettings, seq_length: int
    ) -> None:
        template = get_template(template) if isinstance(template, str) else template
        if not isinstance(template, Qwen2VLTemplate):
            raise TypeError(f"a native-resolution vision tower needs the qwen2_vl chat template (its vision "
                             f"markers delimit each image for the M-RoPE positions), got {template.name!r}")
        if seq_length < 1:
            raise ValueError(f"need seq_length >= 1, got {seq_length}")
        self.tokenizer = tokenizer
        self.template = template
        self.settings = settings
        self.seq_length = seq_length
        self.video_token_id = tokenizer.token_id(VIDEO_PAD)

    def _images(self, record: Record) -> list[VisionInput]:
        limit = self.settings.max_decoded_pixels
        inputs = []
        for number in range(len(record.images)):
            image = load_record_image(record, number, limit)
            try:
                inputs.append(preprocess_image(image, self.settings.image))
            except ValueError as error:  # an aspect ratio smart_resize refuses
                raise ImageError(f"image {record.images[number]!r}: {error}") from None
        return inputs

    def _video(self, record: Record, number: int) -> VideoInput:
        """Video `number` of `record`: decoded from its bytes (tar, Parquet, Energon) or its files."""
        settings, video = self.settings, record.videos[number]
        sampling = (settings.fps, settings.video, settings.max_frames)
        if record.video_bytes is not None:
            data = record.video_bytes[number]
            if isinstance(data, bytes):
                return load_video_bytes(data, f"{record.source}:{video}", *sampling)
            names = [f"{record.source}:{frame}" for frame in video]
            return load_frame_bytes(data, names, record.frame_rate, *sampling)
        return load_video(video, record.frame_rate, settings)

    def _video_grid(self, record: Record, number: int) -> tuple[int, int, int]:
        """The grid `_video` gives, from the video's header or its first frame's (no frame decoded)."""
        settings, video = self.settings, record.videos[number]
        sampling = (settings.fps, settings.video, settings.max_frames)
        if isinstance(video, str):
            if record.video_bytes is None:
                return video_file_grid(Path(video), video, *sampling)
            return video_file_grid(record.video_bytes[number], f"{record.source}:{video}", *sampling)
        if record.video_bytes is None:
            first = image_size(resolve_image_path(video[0], frames_root(video)), repr(video[0]))
        else:
            first = image_size(record.video_bytes[number][0], f"{record.source}:{video[0]}")
        return frame_list_grid(len(video), first, record.frame_rate, *sampling)

    def _videos(self, record: Record, read: Callable[[Record, int], T]) -> list[T]:
        """`read` of every video of `record`; ValueError naming the video when one cannot be used."""
        results = []
        for number, video in enumerate(record.videos):
            try:
                results.append(read(record, number))
            except (ValueError, OSError) as error:  # ImageError (a frame file) is a ValueError
                name = video if isinstance(video, str) else f"of {len(video)} frames from {video[0]!r}"
                raise ValueError(f"video {number} {name}: {error}") from None
        return results

    def _truncate(self, tokenized: QwenTokenized, where: str, source: str) -> QwenTokenized:
        """At most seq_length tokens, cut in text only (see the module docstring)."""
        length = len(tokenized.input_ids)
        cut = self.seq_length
        if length <= cut:
            return tokenized
        for start, end in vision_spans(tokenized):
            if start < cut < end:
                raise BadSample(source, where, "too_long",
                                f"--seq-length {cut} cuts through the vision span [{start}, {end}) of its "
                                f"{length} tokens (a vision span is never cut)")
        kept = replace(
            tokenized,
            input_ids=tokenized.input_ids[:cut],
            labels=tokenized.labels[:cut],
            image_spans=[span for span in tokenized.image_spans if span[1] < cut],
            video_spans=[span for span in tokenized.video_spans if span[1] < cut],
            truncated_from=length,
        )
        try:
            return check_trained_after_truncation(kept, length)
        except AllLabelsMaskedError as error:
            raise BadSample(source, where, "all_masked", str(error)) from None

    def _read(self, record: Record, where: str, images: Callable[[Record], list[T]],
              videos: Callable[[Record, int], U]) -> tuple[list[T], list[U]]:
        """`images(record)` and `videos` of each video, their failures as BadSample "image" / "video"."""
        try:
            image_items = images(record)
        except ImageError as error:
            raise BadSample(record.source, where, "image", str(error)) from None
        try:
            video_items = self._videos(record, videos)
        except ValueError as error:
            raise BadSample(record.source, where, "video", str(error)) from None
        return image_items, video_items

    def _tokens(self, record: Record, where: str, image_tokens: list[int], video_tokens: list[int]) -> QwenTokenized:
        """The conversation rendered with these token counts per image and video and truncated, or BadSample."""
        try:
            tokenized = render_qwen2_vl(record.conversations, self.tokenizer, image_tokens, video_tokens, self.template)
        except AllLabelsMaskedError as error:
            raise BadSample(record.source, where, "all_masked", str(error)) from None
        except (ValueError, TypeError) as error:
            raise BadSample(record.source, where, "schema", str(error)) from None
        return self._truncate(tokenized, where, record.source)

    def build(self, record: Record) -> Sample:
        """The sample for `record`, or BadSample naming it and what is wrong."""
        where = f"sample {record.index} (id {record.sample_id!r})"
        images, videos = self._read(record, where, self._images, self._video)
        kept = self._tokens(record, where, [item.num_tokens for item in images], [item.num_tokens for item in videos])
        images, videos = images[: len(kept.image_spans)], videos[: len(kept.video_spans)]
        return self._sample(record, kept, images, videos)

    def _image_grids(self, record: Record) -> list[tuple[int, int, int]]:
        """The grid of each image of `record` from its header (`native_resolution.image_grid`)."""
        grids = []
        for number in range(len(record.images)):
            width, height = record_image_size(record, number)
            try:
                grids.append(image_grid(height, width, self.settings.image))
            except ValueError as error:  # an aspect ratio smart_resize refuses, as in `_images`
                raise ImageError(f"image {record.images[number]!r}: {error}") from None
        return grids

    def probe(self, record: Record) -> SampleLayout:
        """The counts `build(record)` gives (the (t, h, w) grid of each kept image and video and the
        tokens), reading image headers, the first frame's header of a frame-list video and a video
        file's container header instead of decoding anything; the same BadSample for a bad
        conversation, a missing file, an aspect ratio out of range or a cut through a vision span.
        What only decoding finds (a corrupt image or frame, frames of different sizes, an image above
        max_decoded_pixels, a container whose recorded frame count is wrong) is found by `build` alone,
        so there the counts are the probed record's, not those of the record that replaces it."""
        where = f"sample {record.index} (id {record.sample_id!r})"
        image_grids, video_grids = self._read(record, where, self._image_grids, self._video_grid)
        merge = self.settings.image.merge_size
        kept = self._tokens(record, where, [num_vision_tokens(grid, merge) for grid in image_grids],
                            [num_vision_tokens(grid, merge) for grid in video_grids])
        images, videos = image_grids[: len(kept.image_spans)], video_grids[: len(kept.video_spans)]
        return SampleLayout((1,) * len(images), len(kept.input_ids), tuple(images + videos))

    def _sample(
        self, record: Record, kept: QwenTokenized, images: list[VisionInput], videos: list[VideoInput]
    ) -> Sample:
        settings = self.settings
        image_grids = torch.tensor([item.grid_thw for item in images], dtype=torch.long).reshape(-1, 3)
        video_grids = torch.tensor([item.grid_thw for item in videos], dtype=torch.long).reshape(-1, 3)
        seconds = [item.second_per_grid for item in videos]
        positions = mrope_position_ids(
            kept.input_ids,
            image_token_id=self.tokenizer.image_token_id,
            video_token_id=self.video_token_id,
            spatial_merge_size=settings.image.merge_size,
            image_grid_thw=image_grids,
            video_grid_thw=video_grids,
            second_per_grid_ts=seconds if settings.tokens_per_second is not None else None,
            tokens_per_second=settings.tokens_per_second,
        )
        empty = torch.zeros(0, settings.patch_dim)
        return Sample(
            source=record.source,
            index=record.index,
            sample_id=record.sample_id,
            input_ids=kept.input_ids,
            labels=kept.labels,
            pixel_values=torch.cat([item.pixel_values for item in images]) if images else empty,
            tiles_per_image=[1] * len(images),
            grids=[(1, 1)] * len(images),
            image_spans=list(kept.image_spans),
            text=kept.text,
            truncated_from=kept.truncated_from,
            native=NativeVision(
                image_grid_thw=image_grids,
                pixel_values_videos=torch.cat([item.pixel_values for item in videos]) if videos else empty,
                video_grid_thw=video_grids,
                second_per_grid=seconds,
                video_spans=list(kept.video_spans),
                position_ids=positions,
            ),
        )


__all__ = ["NativeSampleBuilder", "NativeSettings", "load_video", "native_settings", "vision_spans"]
