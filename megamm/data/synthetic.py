"""A deterministic synthetic multimodal dataset for tests, benchmarks and `--mock-data` runs.

Sample i depends only on (seed, i). It is learnable, so a falling loss means training works:

    [BOS] ( [IMG] x tokens_per_image  [COLOR_c] )*  a  a+d  a+2d ...

Each image is a flat color c from a fixed palette plus noise; the token after it names c, so
predicting it needs the image. The text continues an arithmetic sequence (start a, step d drawn per
sample) over the text vocabulary, which a small model learns from the first two terms. Labels are
-100 on BOS and image positions.

`SyntheticNativeDataset` is the same task for a native-resolution (Qwen2-VL family) model: every
image has its own random size within the pixel range, so its patch grid and token count vary, and a
sample carries its patches, grids and M-RoPE positions as `megamm.data.batching` produces them.
`SyntheticAnyResDataset` is the task for an any-resolution (LLaVA-NeXT, LLaVA-OneVision) model: every
image has its own size, so its tiles and tokens vary, and a sample carries its base image and tiles
with the image sizes.
"""

from __future__ import annotations

import math

import torch

from megamm.config import LlavaConfig
from megamm.config.anyres import Size, image_tokens, tiles_per_image
from megamm.config.constants import IGNORE_INDEX
from megamm.data.mrope import mrope_position_ids

BOS_ID = 1
NUM_COLORS = 8
FIRST_COLOR_ID = 2
PALETTE = torch.tensor(
    [[-1, -1, -1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1], [1, 1, 1]],
    dtype=torch.float32,
)


def text_vocabulary(config: LlavaConfig) -> torch.Tensor:
    """The ids the synthetic text is drawn from: above the colors, all but the image (and video) token."""
    first_text = FIRST_COLOR_ID + NUM_COLORS
    language = config.language
    vision_ids = {language.image_token_id} | ({language.video_token_id} - {None})
    text_ids = torch.tensor([i for i in range(first_text, language.vocab_size) if i not in vision_ids])
    if len(text_ids) < 16 or min(vision_ids) < first_text:
        raise ValueError(
            f"synthetic data needs at least 16 text ids from {first_text} up and the image (and video) "
            f"token ids at or above {first_text}; got vocab {language.vocab_size}, image token "
            f"{language.image_token_id}, video token {language.video_token_id}"
        )
    return text_ids


def _with_text(tokens: list[int], text_ids: torch.Tensor, seq_length: int, image_token_id: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokens` (BOS and the image runs) followed by an arithmetic sequence over `text_ids` up to
    `seq_length` -> (input_ids `[s]`, labels `[s]`, ignored on BOS and the image positions)."""
    start = int(torch.randint(0, len(text_ids), (), generator=generator))
    step = int(torch.randint(1, 4, (), generator=generator))
    positions = (start + step * torch.arange(seq_length - len(tokens))) % len(text_ids)
    input_ids = torch.cat([torch.tensor(tokens), text_ids[positions]])
    labels = input_ids.masked_fill(input_ids == image_token_id, IGNORE_INDEX)
    labels[0] = IGNORE_INDEX
    return input_ids, labels


class SyntheticMultimodalDataset:
    def __init__(self, config: LlavaConfig, seq_length: int, seed: int, max_images: int = 1) -> None:
        self.seq_length = seq_length
        self.seed = seed
        self.max_images = max_images
        self.image_token_id = config.language.image_token_id
        self.tokens_per_image = config.image_tokens_per_image
        vision = config.vision
        self.image_shape = (vision.num_channels, vision.image_size, vision.image_size)
        self.text_ids = text_vocabulary(config)
        needed = 3 + max_images * (self.tokens_per_image + 1)
        if seq_length < needed:
            raise ValueError(
                f"synthetic data: sequence length {seq_length} cannot hold {max_images} image(s) of "
                f"{self.tokens_per_image} tokens plus text; need at least {needed}"
            )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        num_images = int(torch.randint(0, self.max_images + 1, (), generator=generator))
        colors = torch.randint(0, NUM_COLORS, (num_images,), generator=generator)
        noise = 0.1 * torch.randn((num_images, *self.image_shape), generator=generator)
        pixel_values = PALETTE[colors][:, : self.image_shape[0], None, None] + noise
        tokens = [BOS_ID]
        for color in colors.tolist():
            tokens += [self.image_token_id] * self.tokens_per_image + [FIRST_COLOR_ID + color]
        input_ids, labels = _with_text(tokens, self.text_ids, self.seq_length, self.image_token_id, generator)
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}


class SyntheticNativeDataset:
    """The synthetic task for a native-resolution tower: images of random sizes (see the module docstring).

    An image is a grid of `h' x w'` merge windows (`h' * w'` tokens, 1 temporal patch) with
    `min_pixels <= h' * w' * factor**2 <= max_pixels` (factor: patch_size * merge_size pixels a side)
    and at most as many tokens as `seq_length` leaves each of `max_images` images; its patches are its
    color plus noise, in the layout of `megamm.data.native_resolution.patchify` (per patch: channel,
    frame, row, column). There are no videos.
    """

    def __init__(self, config: LlavaConfig, seq_length: int, seed: int, max_images: int,
                 pixel_range: tuple[int, int]) -> None:
        vision = config.vision
        native = vision.native_resolution
        if native is None:
            raise ValueError("SyntheticNativeDataset needs a native-resolution vision tower (vision.native_resolution)")
        self.text_ids = text_vocabulary(config)
        self.seq_length, self.seed, self.max_images = seq_length, seed, max_images
        self.image_token_id = config.language.image_token_id
        self.merge = native.spatial_merge_size
        self.channels = vision.num_channels
        self.values_per_channel = native.temporal_patch_size * vision.patch_size**2
        window_pixels = (vision.patch_size * self.merge) ** 2
        self.fewest = max(1, math.ceil(pixel_range[0] / window_pixels))
        self.most = pixel_range[1] // window_pixels
        if max_images:
            self.most = min(self.most, (seq_length - 3) // max_images - 1)
        if max_images and self.most < self.fewest:
            raise ValueError(
                f"synthetic data: --seq-length {seq_length} cannot hold {max_images} image(s) of at least "
                f"{self.fewest} tokens (the fewest the pixel range {pixel_range} gives) plus text"
            )

    def _grid(self, generator: torch.Generator) -> tuple[int, int]:
        """(h', w') merge windows of one image, with fewest <= h' * w' <= most."""
        rows = int(torch.randint(1, self.most + 1, (), generator=generator))
        low, high = max(1, math.ceil(self.fewest / rows)), self.most // rows
        if low > high:
            rows, low, high = 1, self.fewest, self.most
        return rows, int(torch.randint(low, high + 1, (), generator=generator))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        num_images = int(torch.randint(0, self.max_images + 1, (), generator=generator))
        colors = torch.randint(0, NUM_COLORS, (num_images,), generator=generator)
        tokens, patches, grids = [BOS_ID], [], []
        for color in colors.tolist():
            rows, cols = self._grid(generator)
            count = rows * cols * self.merge**2
            noise = 0.1 * torch.randn((count, self.channels, self.values_per_channel), generator=generator)
            patches.append((PALETTE[color][: self.channels, None] + noise).reshape(count, -1))
            grids.append((1, rows * self.merge, cols * self.merge))
            tokens += [self.image_token_id] * (rows * cols) + [FIRST_COLOR_ID + color]
        input_ids, labels = _with_text(tokens, self.text_ids, self.seq_length, self.image_token_id, generator)
        image_grid_thw = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": torch.cat(patches) if patches else torch.zeros(0, self.channels * self.values_per_channel),
            "image_grid_thw": image_grid_thw,
            # No videos: no id is the video token.
            "position_ids": mrope_position_ids(input_ids, image_token_id=self.image_token_id, video_token_id=-1,
                                               spatial_merge_size=self.merge, image_grid_thw=image_grid_thw),
        }


class SyntheticAnyResDataset:
    """The synthetic task for an any-resolution model (`model.anyres`): images of random sizes.

    An image's (height, width) is drawn from the multiples of half a tile up to the largest
    pinpoint's side whose tokens (`megamm.config.anyres.image_tokens`: base tile, unpadded tiles,
    a newline per row) fit the share of `seq_length` each of `max_images` images gets; its tower
    inputs are its base image and tiles (`tiles_per_image`), `[tiles, C, tile, tile]`, each its color
    plus noise; under LLaVA-OneVision's multi-image rule (`anyres.single_tile_multi_image`) each image
    of a sample of several is one input with `image_tokens(..., tiled=False)` tokens. A sample carries
    them with `image_sizes` `[images, 2]`.
    """

    def __init__(self, config: LlavaConfig, seq_length: int, seed: int, max_images: int) -> None:
        anyres, vision = config.anyres, config.vision
        if anyres is None:
            raise ValueError("SyntheticAnyResDataset needs an any-resolution model (model.anyres)")
        self.text_ids = text_vocabulary(config)
        self.seq_length, self.seed, self.max_images = seq_length, seed, max_images
        self.image_token_id = config.language.image_token_id
        self.tile, self.channels = vision.image_size, vision.num_channels
        self.pinpoints, self.anyres, self.grid = anyres.pinpoints, anyres, vision.grid_size
        step = max(1, self.tile // 2)
        sides = range(step, max(max(point) for point in self.pinpoints) + 1, step)
        budget = (seq_length - 3) // max(1, max_images) - 1
        candidates = {(h, w): image_tokens((h, w), self.pinpoints, self.tile, vision.grid_size, anyres.max_num_patches)
                      for h in sides for w in sides}
        self.sizes: list[Size] = [size for size, tokens in candidates.items() if tokens <= budget]
        self.tokens = candidates
        if max_images and not self.sizes:
            raise ValueError(
                f"synthetic data: --seq-length {seq_length} cannot hold {max_images} any-resolution image(s) plus "
                f"text: the smallest image takes {min(candidates.values())} tokens")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        num_images = int(torch.randint(0, self.max_images + 1, (), generator=generator))
        colors = torch.randint(0, NUM_COLORS, (num_images,), generator=generator)
        tokens, tiles, sizes = [BOS_ID], [], []
        tiled = self.anyres.tiles_images_of(num_images)
        for color in colors.tolist():
            size = self.sizes[int(torch.randint(0, len(self.sizes), (), generator=generator))]
            count = tiles_per_image(size, self.pinpoints, self.tile, tiled)
            noise = 0.1 * torch.randn((count, self.channels, self.tile, self.tile), generator=generator)
            tiles.append(PALETTE[color][: self.channels, None, None] + noise)
            sizes.append(size)
            image_length = self.tokens[size] if tiled else image_tokens(size, self.pinpoints, self.tile, self.grid,
                                                                         tiled=False)
            tokens += [self.image_token_id] * image_length + [FIRST_COLOR_ID + color]
        input_ids, labels = _with_text(tokens, self.text_ids, self.seq_length, self.image_token_id, generator)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": torch.cat(tiles) if tiles else torch.zeros(0, self.channels, self.tile, self.tile),
            "image_sizes": torch.tensor(sizes, dtype=torch.long).reshape(-1, 2),
        }


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | None]:
    """Stack samples of equal length; images of all samples in batch order. Native-resolution samples
    (with `image_grid_thw`) also give their grids, no videos and `[3, b, s]` positions; any-resolution
    samples (with `image_sizes`) their images' sizes."""
    images = [s["pixel_values"] for s in samples]
    native = "image_grid_thw" in samples[0]
    counted = "image_grid_thw" if native else "image_sizes" if "image_sizes" in samples[0] else "pixel_values"
    counts = torch.tensor([len(s[counted]) for s in samples])
    batch = {
        "input_ids": torch.stack([s["input_ids"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "pixel_values": torch.cat(images) if int(counts.sum()) else None,
        "images_per_sample": counts,
    }
    if counted == "image_sizes":
        batch["image_sizes"] = torch.cat([s["image_sizes"] for s in samples]) if int(counts.sum()) else None
    if native:
        batch.update({
            "image_grid_thw": torch.cat([s["image_grid_thw"] for s in samples]) if int(counts.sum()) else None,
            "pixel_values_videos": None,
            "video_grid_thw": None,
            "videos_per_sample": torch.zeros(len(samples), dtype=torch.long),
            "position_ids": torch.stack([s["position_ids"] for s in samples], dim=1),
        })
    return batch


def microbatch_indices(
    first_position: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
) -> list[list[int]]:
    """Sample indices of this dp rank's microbatches for the global batch that starts at sample
    `first_position` (the samples consumed before it, `megamm.data.loader.ResumePoint`).

    A global batch consumes samples `[first, first + G)` whatever dp and accumulation are, and each
    dp rank takes a contiguous 1/dp of them, so a run can resume from its consumed samples alone and
    changing dp or accumulation does not change what one step trains on.
    """
    per_rank = global_batch // dp_size
    start = first_position + dp_rank * per_rank
    return [list(range(start + m, start + m + micro_batch)) for m in range(0, per_rank, micro_batch)]
