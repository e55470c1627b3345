"""LLaVA-NeXT's any-resolution image layout: tile features -> one image's embedding sequence.

The tower and projector run on every tower input of the batch (each image's base image and its
`rows x cols` tiles, megamm.data.anyres_images), giving `[tiles, g*g, h]` (g: the tower's patch
grid). For each image, in batch order, this module lays the tile features out as one
`(g*rows) x (g*cols)` grid, cuts away the rows or columns that only cover the padding the
preprocessing added around the resized image (the spatial unpad, megamm.config.anyres), appends
(LLaVA-OneVision's anyres_max_N) shrinks a grid larger than N tiles' worth bilinearly, appends
the learned `image_newline` embedding after each remaining row, and puts the base image's `g*g`
features first: `g*g + kept_rows * (kept_cols + 1)` embeddings, the count the data pipeline
expanded the image's placeholder to (transformers' `pack_image_features`, `spatial_unpad`). An image
that is not tiled (LLaVA-OneVision, an image of a multi-image sample: `AnyResConfig.single_tile_multi_image`)
is one tower input: its `g*g` features and one newline (`pack_image_features`' single-patch branch).

LLaVA-OneVision's videos (`pool_video`): each frame is one tower input, its `g x g` features pooled
bilinearly to `ceil(g/2) x ceil(g/2)` (transformers' `apply_pooling`), the frames' features in order
and one `image_newline` after them (`get_video_features`).

`image_newline` `[h]` is replicated over tp: it is added after the projector, whose output is
complete on every tp rank, so its gradient is complete too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megamm.config import LlavaConfig
from megamm.config.anyres import (
    Size,
    downsampled_grid,
    image_tokens,
    pooled_grid,
    tile_grid,
    tiles_per_image,
    unpadded_grid,
    video_tokens,
)
from megamm.parallel.params import ParamOwner, ParamSpec
from megamm.parallel.sharding import ParamLayout, normal_init
from megamm.parallel.state import ParallelState


def size_list(image_sizes: torch.Tensor | Sequence[Sequence[int]]) -> list[Size]:
    """`[n, 2]` (height, width) per image -> a list of int pairs."""
    rows = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes
    return [(int(h), int(w)) for h, w in rows]


class AnyResLayout(ParamOwner):
    def __init__(self, config: LlavaConfig, state: ParallelState) -> None:
        super().__init__()
        if config.anyres is None:
            raise ValueError("AnyResLayout needs config.anyres")
        language = config.language.transformer
        self.pinpoints = config.anyres.pinpoints
        self.tile = config.vision.image_size
        self.grid = config.vision.grid_size
        self.max_num_patches = config.anyres.max_num_patches
        self.settings = config.anyres
        hidden = language.hidden_size
        # transformers draws it with std 1 / sqrt(hidden): an embedding-sized vector.
        spec = ParamSpec(ParamLayout((hidden,), normal_init(1 / math.sqrt(hidden))))
        self.image_newline: nn.Parameter = self.create_parameter("image_newline", spec, state, language.params_dtype)

    def tiled_images(self, images: int, per_sample: Sequence[int] | None) -> list[bool]:
        """Whether each of the batch's `images` images is tiled, from the images of each sample
        (`per_sample`, transformers' `batch_num_images`; None: every image tiled, as transformers
        does without it)."""
        return [True] * images if per_sample is None else self.settings.tiled_images(per_sample)

    def tile_counts(self, sizes: list[Size], tiled: list[bool]) -> list[int]:
        """Tower inputs of each image: base image + tiles, or 1 when it is not tiled."""
        return [tiles_per_image(size, self.pinpoints, self.tile, t) for size, t in zip(sizes, tiled, strict=True)]

    def token_counts(self, sizes: list[Size], tiled: list[bool]) -> list[int]:
        """Image tokens of each image (megamm.config.anyres.image_tokens)."""
        return [image_tokens(size, self.pinpoints, self.tile, self.grid, self.max_num_patches, t)
                for size, t in zip(sizes, tiled, strict=True)]

    def video_token_counts(self, videos: int, frames: int) -> list[int]:
        """Video tokens of each of `videos` videos of `frames` frames (megamm.config.anyres.video_tokens)."""
        return [video_tokens(frames, self.grid)] * videos

    def pool_video(self, features: torch.Tensor, frames: int) -> torch.Tensor:
        """features `[videos * frames, g*g, h]` (video after video, frames in order) ->
        `[videos * video_tokens(frames, g), h]`: each frame's grid pooled, then one newline per video."""
        g, hidden = self.grid, features.shape[-1]
        pooled = pooled_grid(g)
        # transformers' apply_pooling: [frames, h, g, g], bilinear, corners not aligned.
        grids = features.view(-1, g, g, hidden).permute(0, 3, 1, 2)
        grids = F.interpolate(grids, size=[pooled, pooled], mode="bilinear").permute(0, 2, 3, 1)
        per_video = grids.reshape(-1, frames * pooled * pooled, hidden)
        newline = self.image_newline.to(features.dtype).expand(per_video.shape[0], 1, hidden)
        return torch.cat([per_video, newline], dim=1).reshape(-1, hidden)

    def forward(self, features: torch.Tensor, sizes: list[Size], tiled: list[bool]) -> torch.Tensor:
        """features `[tiles, g*g, h]` (every image's base image then its tiles, or its one tower input
        where `tiled` is False; images in batch order) -> `[sum of token_counts(sizes, tiled), h]`,
        image after image."""
        g, hidden = self.grid, features.shape[-1]
        newline = self.image_newline.to(features.dtype)
        out, offset = [], 0
        for size, is_tiled in zip(sizes, tiled, strict=True):
            if not is_tiled:
                out += [features[offset], newline[None]]
                offset += 1
                continue
            rows, cols = tile_grid(size, self.pinpoints, self.tile)
            base = features[offset]
            tiles = features[offset + 1 : offset + 1 + rows * cols]
            offset += 1 + rows * cols
            # [rows * cols, g*g, h] -> [rows, g, cols, g, h] -> one [g*rows, g*cols, h] grid.
            grid = tiles.view(rows, cols, g, g, hidden).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, hidden)
            top, bottom, left, right = unpadded_grid(size, rows * g, cols * g)
            grid = grid[top:bottom, left:right]
            shrunk = downsampled_grid(bottom - top, right - left, g, self.max_num_patches)
            if shrunk is not None:
                # transformers' interpolation on [1, h, rows, cols] (bilinear, corners not aligned).
                grid = F.interpolate(grid.permute(2, 0, 1)[None], list(shrunk), mode="bilinear")[0].permute(1, 2, 0)
            ends = newline.expand(grid.shape[0], 1, hidden)
            out += [base, torch.cat([grid, ends], dim=1).reshape(-1, hidden)]
        if offset != features.shape[0]:
            raise ValueError(f"{features.shape[0]} tower inputs, but the image sizes {sizes} give {offset} "
                             f"(base image + tiles each, one where not tiled: {tiled})")
        return torch.cat(out)
