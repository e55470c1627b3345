"""One raw `Record` -> one `Sample` as the model sees it: token ids, labels and vision-tower inputs.

The order of work matters: images are decoded (and tiled) first, because a tiled image's placeholder
expands to `tiles x image_tokens_per_image` image tokens, and only then is the conversation rendered
(`megamm.data.templates.render`), so labels are built span by span with the right image lengths. The
result is truncated to the sequence length without cutting an image (`templates.truncate`); the images
the cut removed are dropped with it.

Every way a sample can be unusable becomes `BadSample` naming the file, the sample and the reason, so
the loader can skip and count it: an image that is missing, escapes the image folder, is truncated,
corrupt or a decompression bomb ("image"); a conversation whose placeholders, roles or values are
wrong ("schema"); a sample in which nothing would be trained ("all_masked", the silent loss-0 bug);
a sample too long even without its text ("too_long").

An any-resolution model (LLaVA-NeXT, `ImageSettings.anyres`) tiles each image by
`megamm.data.anyres_images` and expands its placeholder to the image's own token count
(`megamm.config.anyres.image_tokens`, from its size); the sample keeps each image's size, which the
model needs to lay the tiles out. Under LLaVA-OneVision's multi-image rule
(`AnyResConfig.single_tile_multi_image`) the images of a record that holds several are not tiled:
each is one tower input, padded to a square with the mean color and resized (the processor's
`pad_to_square`), with `g^2 + 1` tokens; a truncation that would leave one of them alone (the model
tiles a lone image) is "too_long". With `ImageSettings.videos` (LLaVA-OneVision) a record's videos
become `Sample.pixel_values_videos` (`megamm.data.anyres_videos`: the same number of frames from every
video, each frame one tile), each "<video>" placeholder expanded to the video's token count
(`megamm.config.anyres.video_tokens`); truncation keeps videos whole as it keeps images. A bad
video (unreadable, too few frames) is "video". Without video settings a record with videos is
refused ("schema").

The native-resolution (Qwen2-VL) family builds its samples in `megamm.data.native_samples`, into the
same `Sample` with its patches, grids and M-RoPE positions in `Sample.native`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from PIL import Image

from megamm.config.anyres import AnyResConfig, Size, image_tokens, tile_grid, tiles_per_image, video_tokens
from megamm.data.anyres_images import preprocess_anyres
from megamm.data.anyres_videos import VideoSettings, check_video_lengths, record_videos
from megamm.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    Normalization,
    PreprocessMode,
    choose_grid,
    image_size,
    load_image,
    load_image_bytes,
    preprocess,
    preprocess_tiles,
    resolve_image_path,
    tile_count,
)
from megamm.data.sources import BadSample, Record
from megamm.data.templates import (
    AllLabelsMaskedError,
    ChatTemplate,
    Tokenized,
    VideoTokenized,
    get_template,
    render,
    render_with_videos,
    truncate,
)
from megamm.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class ImageSettings:
    """How an image becomes vision-tower inputs.

    size: the tower's `image_size`; mode: "pad" | "crop" | "resize" for a single image (see
    `megamm.data.images.preprocess`); normalization: the vision tower family (clip, siglip) whose
    statistics apply; max_tiles: 1 for one input per image, more for dynamic tiling (a grid of
    `size` tiles chosen by aspect ratio, plus a thumbnail when there is more than one tile; tiles
    are cut from the image resized to the grid, so `mode` does not apply to them); max_pixels:
    larger images are refused before decoding. anyres: LLaVA-NeXT any-resolution tiling (the model's
    `anyres` section, megamm.config.anyres), a base image plus tiles per image; then `mode`,
    `max_tiles` and `thumbnail` do not apply. float_ratios: choose the grid by float aspect ratios
    (`megamm.data.images.float_tile_ratios`, the InternVL processors' rule). videos: LLaVA-OneVision's
    video frames and token (`megamm.data.anyres_videos`; with `anyres` only); None: records with
    videos are refused.
    """

    size: int
    mode: PreprocessMode = "pad"
    normalization: Normalization = "clip"
    max_tiles: int = 1
    thumbnail: bool = True
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    anyres: AnyResConfig | None = None
    float_ratios: bool = False
    videos: VideoSettings | None = None

    def __post_init__(self) -> None:
        if self.videos is not None and self.anyres is None:
            raise ValueError("video frames are tiles of an any-resolution (LLaVA-OneVision) layout: videos need anyres")


@dataclass
class NativeVision:
    """What a native-resolution (Qwen2-VL family) sample adds: grids, videos and M-RoPE positions.

    image_grid_thw: `[n_images, 3]` int64 (t, h, w) patch grid of each image, in token order (the
    image patches are `Sample.pixel_values`). pixel_values_videos: `[video patches, C * T * P * P]`
    float32, the videos' patches concatenated in token order; video_grid_thw `[n_videos, 3]` int64;
    second_per_grid: seconds one temporal patch of each video spans. video_spans: [start, end) of each
    video's tokens. position_ids: `[3, len]` int64 M-RoPE positions of the sample alone (temporal,
    height, width; `megamm.data.mrope`), computed once here in the loader's workers.
    """

    image_grid_thw: torch.Tensor
    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    second_per_grid: list[float]
    video_spans: list[tuple[int, int]]
    position_ids: torch.Tensor

    @property
    def num_videos(self) -> int:
        return int(self.video_grid_thw.shape[0])

    @property
    def image_patches(self) -> list[int]:
        """Patches (t * h * w) of each image."""
        return [int(t * h * w) for t, h, w in self.image_grid_thw.tolist()]

    @property
    def video_patches(self) -> list[int]:
        """Patches (t * h * w) of each video."""
        return [int(t * h * w) for t, h, w in self.video_grid_thw.tolist()]


@dataclass
class Sample:
    """A tokenized sample with its images.

    input_ids / labels: equal-length lists (labels aligned with the ids, -100 where not trained; the
    model shifts them). pixel_values: `[n, 3, size, size]` float32, n = sum(tiles_per_image), in the
    order the image tokens appear; for the native-resolution family the images' patches
    `[patches, C * T * P * P]` (one tower input per image, `native` holds the grids). grids: (cols,
    rows) of each image's tiles ((1, 1) untiled and for the native family; any-resolution: the tiles
    after the base image). image_spans: [start, end)
    of each image's tokens, as the template placed them. image_sizes: (height, width) of each image
    of an any-resolution sample (None for every other kind). pixel_values_videos: `[videos, frames, 3,
    size, size]` float32 of an any-resolution (LLaVA-OneVision) sample's videos, in token order (None
    without videos).
    """

    source: str
    index: int
    sample_id: str
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor
    tiles_per_image: list[int]
    grids: list[tuple[int, int]]
    image_spans: list[tuple[int, int]]
    text: str
    truncated_from: int | None = None
    native: NativeVision | None = None
    image_sizes: list[Size] | None = None
    pixel_values_videos: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_images(self) -> int:
        """Vision-tower inputs from images (tiles included; videos not)."""
        return sum(self.tiles_per_image)

    @property
    def num_videos(self) -> int:
        if self.native is not None:
            return self.native.num_videos
        return 0 if self.pixel_values_videos is None else int(self.pixel_values_videos.shape[0])


def load_record_image(record: Record, number: int, max_pixels: int | None) -> Image.Image:
    """Image `number` of `record`, decoded from its bytes (tar, Parquet, Energon) or its resolved file;
    ImageError naming it when it cannot be used."""
    name = record.images[number]
    if record.image_bytes is not None:
        return load_image_bytes(record.image_bytes[number], f"{record.source}:{name}", max_pixels)
    return load_image(name, os.path.dirname(name) or ".", max_pixels)


def record_image_size(record: Record, number: int) -> tuple[int, int]:
    """(width, height) of image `number` of `record` from its header alone (the probes' read);
    ImageError naming it when the header is unreadable or the file missing."""
    name = record.images[number]
    if record.image_bytes is not None:
        return image_size(record.image_bytes[number], f"{record.source}:{name}")
    return image_size(resolve_image_path(name, os.path.dirname(name) or "."), repr(name))


@dataclass(frozen=True)
class SampleLayout:
    """What `build` would give, in counts: vision-tower inputs of each kept image (tiles included;
    1 per image for the native-resolution family) and the sample's tokens (image tokens included).

    grids: the native-resolution family's (t, h, w) patch grid of each kept image, then of each kept
    video (one tower sequence each; `NativeSampleBuilder.probe`); empty for the fixed-size towers.
    """

    tiles_per_image: tuple[int, ...]
    tokens: int
    grids: tuple[tuple[int, int, int], ...] = ()


def _refuse_videos(record: Record, videos: VideoSettings | None) -> str:
    """The record's name in errors; BadSample when it holds videos and the model takes none."""
    where = f"sample {record.index} (id {record.sample_id!r})"
    if record.videos and videos is None:
        raise BadSample(record.source, where, "schema",
                        f"it holds {len(record.videos)} video(s); video samples are built only for a "
                        "native-resolution vision tower (the Qwen2-VL family) or an any-resolution model "
                        "with language.video_token_id (LLaVA-OneVision)")
    return where


class SampleBuilder:
    """Turns records into samples for one model: its tokenizer, chat template, tower and sequence length.

    `tokens_per_tile` is the model's `tile_tokens` (embeddings one tower input yields); with
    any-resolution tiling it is the tower's patch grid squared (class token dropped, no pixel
    shuffle: LlavaConfig checks), so the grid is its square root.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str | ChatTemplate,
        images: ImageSettings,
        tokens_per_tile: int,
        seq_length: int,
    ) -> None:
        if tokens_per_tile < 1 or seq_length < 1:
            raise ValueError(f"need tokens_per_tile >= 1 and seq_length >= 1, got {tokens_per_tile}, {seq_length}")
        if images.max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {images.max_tiles}")
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.images = images
        self.tokens_per_tile = tokens_per_tile
        self.seq_length = seq_length
        self.grid = math.isqrt(tokens_per_tile)
        if images.anyres is not None and self.grid**2 != tokens_per_tile:
            raise ValueError(f"any-resolution tiling lays {tokens_per_tile} tokens per tile out as a square patch "
                             f"grid, but {tokens_per_tile} is not a square")

    def _tiled(self, record: Record) -> bool:
        """Whether the record's any-resolution images are tiled (all but the images of a multi-image
        record under `single_tile_multi_image`)."""
        return self.images.anyres is None or self.images.anyres.tiles_images_of(len(record.images))

    def _image_tokens(self, tiles: list[int], sizes: list[Size], tiled: bool) -> list[int]:
        """Image tokens of each image: its tower inputs times the tokens of one, or (any-resolution) the
        count from its size and whether it is tiled."""
        anyres = self.images.anyres
        if anyres is None:
            return [n * self.tokens_per_tile for n in tiles]
        return [image_tokens(size, anyres.pinpoints, self.images.size, self.grid, anyres.max_num_patches, tiled)
                for size in sizes]

    def _anyres_inputs(self, img: Image.Image, tiled: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        """An any-resolution image's tower inputs `[n, 3, size, size]` and (cols, rows) tile grid: its base
        image and tiles, or, not tiled, one input: the image padded to a square with the mean color
        and resized, LlavaOnevisionImageProcessor's `pad_to_square` then resize, which is
        `preprocess`'s "pad" mode."""
        settings = self.images
        if not tiled:
            return preprocess(img, settings.size, "pad", settings.normalization)[None], (1, 1)
        pinpoints = settings.anyres.pinpoints
        rows, cols = tile_grid((img.height, img.width), pinpoints, settings.size)
        return preprocess_anyres(img, settings.size, pinpoints, settings.normalization)[0], (cols, rows)

    def _pixels(self, record: Record) -> tuple[list[torch.Tensor], list[tuple[int, int]], list[Size]]:
        settings = self.images
        pixels, grids, sizes = [], [], []
        for number in range(len(record.images)):
            img = load_record_image(record, number, settings.max_pixels)
            sizes.append((img.height, img.width))
            if settings.anyres is not None:
                inputs, grid = self._anyres_inputs(img, self._tiled(record))
                pixels.append(inputs)
                grids.append(grid)
            elif settings.max_tiles == 1:
                pixels.append(preprocess(img, settings.size, settings.mode, settings.normalization)[None])
                grids.append((1, 1))
            else:
                tiles, grid = preprocess_tiles(
                    img, settings.size, settings.max_tiles, settings.normalization, settings.thumbnail,
                    float_ratios=settings.float_ratios,
                )
                pixels.append(tiles)
                grids.append(grid)
        return pixels, grids, sizes

    def _tiles(self, record: Record) -> tuple[list[int], list[Size]]:
        """Tower inputs and (height, width) of each image from its header alone (the grid
        `preprocess_tiles` or the pinpoint `preprocess_anyres` picks)."""
        settings, tiles, sizes = self.images, [], []
        for number in range(len(record.images)):
            size = record_image_size(record, number)
            sizes.append((size[1], size[0]))
            if settings.anyres is not None:
                tiles.append(tiles_per_image(sizes[-1], settings.anyres.pinpoints, settings.size, self._tiled(record)))
            elif settings.max_tiles == 1:
                tiles.append(1)
            else:
                grid = choose_grid(*size, settings.max_tiles, tile_size=settings.size,
                                   float_ratios=settings.float_ratios)
                tiles.append(tile_count(grid, settings.thumbnail))
        return tiles, sizes

    def probe(self, record: Record) -> SampleLayout:
        """The counts `build(record)` gives, reading image headers instead of decoding the pixels; the
        same BadSample for a bad conversation or a missing image (an image that fails to decode or exceeds
        max_pixels is found by `build` only, so there the counts are those of the record replaced)."""
        where = _refuse_videos(record, self.images.videos)
        try:
            tiles, sizes = self._tiles(record)
        except ImageError as error:
            raise BadSample(record.source, where, "image", str(error)) from None
        if record.videos:
            try:
                check_video_lengths(record, self.images.videos)
            except ValueError as error:
                raise BadSample(record.source, where, "video", str(error)) from None
        kept = self._tokens(record, where, self._image_tokens(tiles, sizes, self._tiled(record)),
                            self._video_tokens(record))
        return SampleLayout(tuple(tiles[: len(kept.image_spans)]), len(kept.input_ids))

    def _video_tokens(self, record: Record) -> list[int]:
        """Video tokens of each video of `record` (every video has `videos.frames` frames)."""
        videos = self.images.videos
        return [] if videos is None else [video_tokens(videos.frames, self.grid)] * len(record.videos)

    def _tokens(self, record: Record, where: str, tokens: list[int], video_counts: list[int]) -> Tokenized:
        """The conversation rendered with `tokens` image tokens per image (and `video_counts` video
        tokens per video) and truncated, or BadSample."""
        try:
            if video_counts:
                tokenized = render_with_videos(record.conversations, self.template, self.tokenizer, tokens,
                                               video_counts, self.images.videos.token_id)
            else:
                tokenized = render(record.conversations, self.template, self.tokenizer, tokens)
            kept = truncate(tokenized, self.seq_length)
        except AllLabelsMaskedError as error:
            raise BadSample(record.source, where, "all_masked", str(error)) from None
        except (ValueError, TypeError) as error:
            raise BadSample(record.source, where, "schema", str(error)) from None
        if kept is None:
            first_end = tokenized.vision_spans()[0][1]
            raise BadSample(
                record.source, where, "too_long",
                f"its first image or video ends at token {first_end}, beyond --seq-length {self.seq_length}",
            )
        if len(kept.image_spans) == 1 and not self._tiled(record):
            raise BadSample(
                record.source, where, "too_long",
                f"--seq-length {self.seq_length} keeps 1 of its {len(record.images)} images, untiled as an image of "
                "a multi-image sample, but the model tiles a sample's lone image (anyres.single_tile_multi_image)",
            )
        return kept

    def build(self, record: Record) -> Sample:
        """The sample for `record`, or BadSample naming it and what is wrong."""
        where = _refuse_videos(record, self.images.videos)
        try:
            pixels, grids, sizes = self._pixels(record)
        except ImageError as error:
            raise BadSample(record.source, where, "image", str(error)) from None
        videos = self._videos(record, where)
        tiles = [p.shape[0] for p in pixels]
        kept = self._tokens(record, where, self._image_tokens(tiles, sizes, self._tiled(record)),
                            self._video_tokens(record))
        images_kept = len(kept.image_spans)
        videos_kept = videos[: len(kept.video_spans)] if isinstance(kept, VideoTokenized) else []
        size = self.images.size
        pixel_values = torch.cat(pixels[:images_kept]) if images_kept else torch.zeros(0, 3, size, size)
        return Sample(
            source=record.source,
            index=record.index,
            sample_id=record.sample_id,
            input_ids=kept.input_ids,
            labels=kept.labels,
            pixel_values=pixel_values,
            tiles_per_image=tiles[:images_kept],
            grids=grids[:images_kept],
            image_spans=list(kept.image_spans),
            text=kept.text,
            truncated_from=kept.truncated_from,
            image_sizes=sizes[:images_kept] if self.images.anyres is not None else None,
            pixel_values_videos=torch.stack(videos_kept) if videos_kept else None,
        )

    def _videos(self, record: Record, where: str) -> list[torch.Tensor]:
        """`[frames, 3, size, size]` of each video of `record` (none without video settings), or
        BadSample "video"."""
        settings = self.images
        if not record.videos:
            return []
        try:
            return record_videos(record, settings.videos, settings.size, settings.normalization)
        except ValueError as error:
            raise BadSample(record.source, where, "video", str(error)) from None
