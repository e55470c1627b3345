"""LLaVA-NeXT any-resolution tiling: the settings and the arithmetic every layer shares.

An image of any size is resized (aspect kept) and padded to the best of a list of resolutions
(`image_grid_pinpoints`, multiples of the tower's image size), cut into `rows x cols` tiles of the
tower's size, and preceded by a base image (the whole image squashed to one tile). The tower
encodes every tile; the tile features are laid back out as one `g*rows x g*cols` grid (g: the
tower's patch grid), the rows and columns that only hold padding are cut off (the spatial unpad),
and a learned newline embedding ends each remaining row. LLaVA-OneVision (`anyres_max_N`) then
shrinks a grid that holds more than about N tiles' worth of features, bilinearly, before the
newlines are added. A OneVision video's frames are single tiles whose feature grids are pooled 2x
bilinearly, one newline after the last frame. LLaVA-OneVision also gives each image of a sample that
holds more than one a single tower input (the image padded to a square, resized to the tile) whose
`g x g` features end with one newline (`single_tile_multi_image`, transformers' `batch_num_images`
rule); a sample's lone image is tiled. The data pipeline (how many tiles, how
many image tokens to expand) and the model (how to lay the features out, the per-sample token
check) compute the same numbers, so they are written once, here: transformers'
`select_best_resolution`, `get_anyres_image_grid_shape` and LlavaNextProcessor's (and
LlavaOnevisionProcessor's) token rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# A (height, width) image size.
Size = tuple[int, int]


@dataclass
class AnyResConfig:
    """LLaVA-NeXT's any-resolution image layout (`LlavaConfig.anyres`; None: one tile per image).

    image_grid_pinpoints: the resolutions (height, width) in pixels an image may be tiled at, each
    a multiple of `vision.image_size` (transformers' `image_grid_pinpoints`).
    max_num_patches: LLaVA-OneVision's `anyres_max_N`: an unpadded feature grid of more than
    N * g^2 features (by a factor over 1.1^2) is downsampled bilinearly to about N * g^2; None:
    never (LLaVA-NeXT).
    single_tile_multi_image: LLaVA-OneVision's rule for samples of several images: each of their
    images is one tower input (padded to a square, resized to the tile) giving `g^2 + 1` tokens (its
    features, one newline); only a sample's lone image is tiled. False: every image is tiled
    (LLaVA-NeXT). The OneVision adapter sets it on import."""

    image_grid_pinpoints: tuple[tuple[int, ...], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    max_num_patches: int | None = None
    single_tile_multi_image: bool = False

    @property
    def pinpoints(self) -> list[Size]:
        return [(int(h), int(w)) for h, w in self.image_grid_pinpoints]

    def tiles_images_of(self, images_in_sample: int) -> bool:
        """Whether the images of a sample of `images_in_sample` images are tiled (transformers'
        `need_patching`: a multi-image sample's are not under `single_tile_multi_image`)."""
        return images_in_sample == 1 or not self.single_tile_multi_image

    def tiled_images(self, images_per_sample: Sequence[int]) -> list[bool]:
        """Per image (samples in order, each sample's images in order), whether it is tiled, for samples
        of `images_per_sample` images each (transformers' `batch_num_images`)."""
        return [self.tiles_images_of(int(n)) for n in images_per_sample for _ in range(int(n))]

    def problems(self, tile: int) -> list[str]:
        """What is wrong with the pinpoints for a tower of `tile` x `tile` pixels."""
        where = "anyres.image_grid_pinpoints"
        if not self.image_grid_pinpoints:
            return [f"{where}: empty; give at least one (height, width) resolution"]
        found = []
        if self.max_num_patches is not None and self.max_num_patches < 1:
            found.append(f"anyres.max_num_patches must be >= 1 (anyres_max_N), got {self.max_num_patches}")
        for point in self.image_grid_pinpoints:
            if len(point) != 2 or min(point) < 1:
                found.append(f"{where}: {list(point)} is not a (height, width) pair of positive sizes")
            elif point[0] % tile or point[1] % tile:
                found.append(f"{where}: {list(point)} is not a multiple of the vision tower's image size {tile} "
                             f"(each resolution is cut into whole tiles)")
        return found


def select_best_resolution(size: Size, pinpoints: list[Size]) -> Size:
    """The pinpoint an image of `size` (height, width) is tiled at: the one that keeps the most of its
    pixels after an aspect-preserving downscale, then the one that wastes the fewest (transformers'
    `select_best_resolution`, whose float products and truncations are kept so ties break alike)."""
    height, width = size
    best, best_effective, best_wasted = pinpoints[0], 0, float("inf")
    for target_h, target_w in pinpoints:
        scale = min(target_w / width, target_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_w * target_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (target_h, target_w), effective, wasted
    return best


def tile_grid(size: Size, pinpoints: list[Size], tile: int) -> Size:
    """(rows, cols) of `tile`-pixel tiles an image of `size` (height, width) is cut into."""
    height, width = select_best_resolution(size, pinpoints)
    return height // tile, width // tile


def tiles_per_image(size: Size, pinpoints: list[Size], tile: int, tiled: bool = True) -> int:
    """Tower inputs of one image: its tiles plus the base image; 1 for an image that is not tiled (one
    of a multi-image sample under `single_tile_multi_image`)."""
    if not tiled:
        return 1
    rows, cols = tile_grid(size, pinpoints, tile)
    return rows * cols + 1


def unpadded_grid(size: Size, rows: int, cols: int) -> tuple[int, int, int, int]:
    """The feature grid of `rows x cols` patches (all tiles laid out) with the padding cut away, for an
    image of `size` (height, width): (top, bottom, left, right) bounds, as transformers' `unpad_image`
    computes them (the pad was split evenly, the odd row or column at the end, so each side loses
    the floored half)."""
    height, width = size
    if width / height > cols / rows:
        kept = int(round(height * (cols / width), 7))
        pad = (rows - kept) // 2
        return pad, rows - pad, 0, cols
    kept = int(round(width * (rows / height), 7))
    pad = (cols - kept) // 2
    return 0, rows, pad, cols - pad


def downsampled_grid(rows: int, cols: int, grid: int, max_num_patches: int | None) -> Size | None:
    """The (rows, cols) an unpadded `rows x cols` feature grid is shrunk to under `anyres_max_N`
    (N = max_num_patches), or None when it is kept: shrunk when its side ratio to an N-tile grid,
    sqrt(rows * cols / (N * grid^2)), exceeds 1.1, each side floor-divided by that ratio
    (transformers' float arithmetic, so the sizes agree exactly)."""
    if max_num_patches is None:
        return None
    ratio = math.sqrt(rows * cols / (max_num_patches * grid**2))
    if ratio <= 1.1:
        return None
    return int(rows // ratio), int(cols // ratio)


def image_tokens(size: Size, pinpoints: list[Size], tile: int, grid: int, max_num_patches: int | None = None,
                 tiled: bool = True) -> int:
    """Image tokens of one image of `size` (height, width): the base tile's `grid^2` features, then the
    unpadded (and, under anyres_max_N, downsampled) tile features with one newline per row
    (LlavaNextProcessor's and LlavaOnevisionProcessor's count for a tower whose class token is
    dropped, or which has none). An image that is not tiled (`tiled=False`: one of a multi-image
    sample under `single_tile_multi_image`) gives its one tile's `grid^2` features and a newline."""
    if not tiled:
        return grid * grid + 1
    rows, cols = tile_grid(size, pinpoints, tile)
    top, bottom, left, right = unpadded_grid(size, grid * rows, grid * cols)
    kept_rows, kept_cols = bottom - top, right - left
    kept_rows, kept_cols = downsampled_grid(kept_rows, kept_cols, grid, max_num_patches) or (kept_rows, kept_cols)
    return grid * grid + kept_rows * (kept_cols + 1)


def pooled_grid(grid: int) -> int:
    """The side of a video frame's feature grid after LLaVA-OneVision's 2x bilinear pooling of its
    `grid x grid` features (ceil(grid / 2), transformers' `apply_pooling`)."""
    return math.ceil(grid / 2)


def video_tokens(frames: int, grid: int) -> int:
    """Video tokens of one video of `frames` frames (LLaVA-OneVision): each frame's pooled features
    (`pooled_grid(grid)^2`), then one newline for the whole video (LlavaOnevisionProcessor's count)."""
    return frames * pooled_grid(grid) ** 2 + 1
