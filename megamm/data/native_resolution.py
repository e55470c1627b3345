"""Native-resolution image preprocessing of the Qwen2-VL family (Qwen2-VL, Qwen2.5-VL).

A Qwen2-VL vision tower takes an image at (nearly) its own size instead of a fixed square: the image
is resized so that both sides are multiples of `patch_size * merge_size` (28 by default) and its
pixel count lies within [min_pixels, max_pixels] (`smart_resize`), then cut into
`patch_size x patch_size` patches. The tower's patch embedding is a 3D convolution over
`temporal_patch_size` frames, so a still image is repeated `temporal_patch_size` times; after the
transformer, `merge_size x merge_size` neighbouring patches are merged into one language-model token.
An image therefore gives

    pixel_values  [t * h * w, channels * temporal_patch_size * patch_size * patch_size]  (float32)
    grid_thw      (t, h, w) = (1, height / patch_size, width / patch_size)

and `t * h * w / merge_size**2` image tokens. The patches are not in raster order: each run of
`merge_size**2` consecutive patches is one merge window (the 2x2 block that becomes one token), and
the windows are in raster order. Within a patch the values are ordered (channel, frame, row, column).

This module reproduces transformers' `Qwen2VLImageProcessorPil` (the processor that needs no
torchvision) exactly, value for value: Pillow's bicubic resize of the 8-bit RGB image, rescaling
by 1/255 in float64 then rounding to float32, normalization with the OpenAI CLIP mean/std in float32,
and the same patch order. `megamm.data.native_samples` calls it for every image of a training sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from megamm.config.constants import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS
from megamm.models.towers.clip import CLIP

# transformers' smart_resize refuses images whose long side is more than this many times the short side.
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class NativeResolution:
    """The preprocessing settings of one Qwen2-VL vision tower (defaults: Qwen2-VL's image processor).

    patch_size: side of a ViT patch in pixels. merge_size: patches per side merged into one token.
    temporal_patch_size: frames per patch (a still image is repeated this many times).
    min_pixels / max_pixels: the range the resized image's pixel count must lie in.
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = IMAGE_MIN_PIXELS
    max_pixels: int = IMAGE_MAX_PIXELS

    def __post_init__(self) -> None:
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"NativeResolution.{name} must be positive, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"NativeResolution.min_pixels ({self.min_pixels}) is larger than max_pixels "
                f"({self.max_pixels})"
            )

    @property
    def factor(self) -> int:
        """What both resized sides are a multiple of: one merge window, in pixels."""
        return self.patch_size * self.merge_size


# Qwen2-VL's video processor allows fewer pixels per frame than its image processor (a video has many).
VIDEO_RESOLUTION = NativeResolution(min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS)


@dataclass(frozen=True)
class VisionInput:
    """One image or video, ready for the vision tower.

    pixel_values: `[t * h * w, channels * temporal_patch_size * patch_size**2]` float32 patches.
    grid_thw: the patch grid (t, h, w); h and w count patches (not merged tokens).
    num_tokens: the language-model tokens it becomes, `t * h * w / merge_size**2`.
    """

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    num_tokens: int


def smart_resize(height: int, width: int, resolution: NativeResolution) -> tuple[int, int]:
    """The (height, width) Qwen2-VL resizes an image of `height x width` to.

    Both sides become multiples of `resolution.factor` (rounded to the nearest one), and when that
    leaves the pixel count outside [min_pixels, max_pixels] the image is scaled by the square root of
    the excess, rounding the sides down (too large) or up (too small), so the aspect ratio is kept as
    well as the grid allows. transformers' `smart_resize`, formula for formula; ValueError for a side
    below 1 or an aspect ratio above MAX_ASPECT_RATIO.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width} (height x width)")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of {height}x{width} (height x width): aspect ratio "
            f"{max(height, width) / min(height, width)} is above {MAX_ASPECT_RATIO}"
        )
    factor = resolution.factor
    h_bar = round(height / factor) * factor  # may be 0 for a thin side: then below min_pixels, scaled up
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > resolution.max_pixels:
        beta = math.sqrt((height * width) / resolution.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < resolution.min_pixels:
        beta = math.sqrt(resolution.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_grid(height: int, width: int, resolution: NativeResolution) -> tuple[int, int, int]:
    """The (1, h, w) patch grid `preprocess_image` gives an image of `height x width`, from its size
    alone (the probe that weighs a sample before decoding it, megamm.data.balance)."""
    resized_height, resized_width = smart_resize(height, width, resolution)
    return 1, resized_height // resolution.patch_size, resized_width // resolution.patch_size


def resize_and_normalize(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """An RGB image -> `[3, height, width]` float32, resized to `size` = (height, width), CLIP-normalized.

    Bicubic resampling by Pillow on the 8-bit image, then `x / 255` computed in float64 and rounded to
    float32, then `(x - mean) / std` in float32: the operations, and so the exact values, of
    transformers' PIL backend (its bicubic resize is Pillow's, and Pillow's differs from a torch
    bicubic resize by whole 8-bit levels, far beyond a float tolerance).
    """
    if image.mode != "RGB":
        raise ValueError(
            f"expected an RGB image (see megamm.data.images.load_image), got mode {image.mode!r}"
        )
    height, width = size
    resized = np.asarray(image.resize((width, height), resample=Image.Resampling.BICUBIC))
    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(CLIP.image_mean, dtype=np.float32)
    std = np.asarray(CLIP.image_std, dtype=np.float32)
    normalized = (scaled - mean) / std  # [height, width, 3]
    return torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))


def num_vision_tokens(grid_thw: Sequence[int], merge_size: int) -> int:
    """Language-model tokens of a (t, h, w) patch grid: one per merge window of every temporal patch."""
    t, h, w = grid_thw
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid {tuple(grid_thw)}: h and w must be multiples of merge_size {merge_size}")
    return t * h * w // (merge_size * merge_size)


def patchify(frames: torch.Tensor, resolution: NativeResolution) -> VisionInput:
    """`[frames, channels, height, width]` -> the flat patches and grid of transformers' Qwen2-VL.

    The frame count must be a multiple of `temporal_patch_size` (callers repeat the image, or pad a
    video with its last frame) and the sides multiples of `resolution.factor`. Patch order: temporal
    patch, merge-window row, merge-window column, row and column within the window; within a patch:
    channel, frame, pixel row, pixel column. The vision tower's patch embedding and its patch merger
    rely on exactly this order (merging is a reshape of `merge_size**2` consecutive patches).
    """
    num_frames, channels, height, width = frames.shape
    tp, p, m = resolution.temporal_patch_size, resolution.patch_size, resolution.merge_size
    if num_frames % tp:
        raise ValueError(f"{num_frames} frames is not a multiple of temporal_patch_size {tp}")
    if height % resolution.factor or width % resolution.factor:
        raise ValueError(
            f"frame size {height}x{width} is not a multiple of {resolution.factor} on both sides"
        )
    grid_t, grid_h, grid_w = num_frames // tp, height // p, width // p
    patches = frames.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
    # (t, window row, window column, row in window, column in window, channel, frame, pixel row, column)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
    grid = (grid_t, grid_h, grid_w)
    return VisionInput(flat.contiguous(), grid, num_vision_tokens(grid, m))


def preprocess_image(image: Image.Image, resolution: NativeResolution) -> VisionInput:
    """One RGB image -> its patches, grid (1, h, w) and token count, as transformers' Qwen2-VL."""
    frame = resize_and_normalize(image, smart_resize(image.height, image.width, resolution))
    return patchify(frame.unsqueeze(0).expand(resolution.temporal_patch_size, -1, -1, -1), resolution)


def preprocess_images(
    images: Sequence[Image.Image], resolution: NativeResolution
) -> tuple[torch.Tensor, torch.Tensor]:
    """Several images as one batch: `pixel_values` `[sum of patches, patch_dim]` (the images'
    patches concatenated in order) and `image_grid_thw` `[n, 3]` int64, the Hugging Face inputs."""
    if not images:
        raise ValueError("preprocess_images needs at least one image")
    inputs = [preprocess_image(image, resolution) for image in images]
    pixel_values = torch.cat([item.pixel_values for item in inputs])
    return pixel_values, torch.tensor([item.grid_thw for item in inputs], dtype=torch.long)


__all__ = [
    "MAX_ASPECT_RATIO",
    "VIDEO_RESOLUTION",
    "NativeResolution",
    "VisionInput",
    "image_grid",
    "num_vision_tokens",
    "patchify",
    "preprocess_image",
    "preprocess_images",
    "resize_and_normalize",
    "smart_resize",
]
