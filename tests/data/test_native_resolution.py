"""megamm.data.native_resolution against transformers' Qwen2-VL image processor (the PIL one, which
needs no torchvision), and the patch layout against an explicit loop.

The comparison is exact (torch.equal): both resize with Pillow's bicubic filter on the 8-bit image,
rescale in float64 and round to float32, and normalize in float32 with the same mean/std, so there is
no arithmetic that could round differently. Small min/max pixel bounds keep the images tiny.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megamm.models.towers.clip import CLIP

CLIP_MEAN, CLIP_STD = CLIP.image_mean, CLIP.image_std
from megamm.data.native_resolution import (
    NativeResolution,
    num_vision_tokens,
    preprocess_image,
    preprocess_images,
    smart_resize,
)

qwen2_vl_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

SMALL = NativeResolution(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 12)
# (height, width): square, wide, tall, thin (below min_pixels on one side), large (above max_pixels),
# odd sizes that round both ways, one side under one merge window.
SIZES = [(40, 40), (30, 100), (100, 31), (9, 300), (200, 150), (17, 23), (57, 43), (12, 12)]


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference(resolution: NativeResolution) -> object:
    return qwen2_vl_pil.Qwen2VLImageProcessorPil(
        min_pixels=resolution.min_pixels,
        max_pixels=resolution.max_pixels,
        patch_size=resolution.patch_size,
        merge_size=resolution.merge_size,
        temporal_patch_size=resolution.temporal_patch_size,
    )


@pytest.mark.parametrize(
    "resolution",
    [
        NativeResolution(),
        SMALL,
        NativeResolution(patch_size=16, merge_size=2, min_pixels=1024, max_pixels=8192),
    ],
)
def test_smart_resize_matches_transformers(resolution: NativeResolution) -> None:
    sizes = [*SIZES, (1, 150), (3000, 20), (480, 640), (1080, 1920), (28, 28), (14, 2800)]
    for height, width in sizes:
        expected = qwen2_vl_pil.smart_resize(
            height, width, resolution.factor, resolution.min_pixels, resolution.max_pixels
        )
        got = smart_resize(height, width, resolution)
        assert got == expected, (height, width)
        assert got[0] % resolution.factor == 0 and got[1] % resolution.factor == 0


def test_smart_resize_limits() -> None:
    assert smart_resize(100, 20000, NativeResolution(max_pixels=28 * 28 * 1280))  # ratio 200 is allowed
    with pytest.raises(ValueError, match="aspect ratio 201.0 is above 200"):
        smart_resize(100, 20100, NativeResolution())
    with pytest.raises(ValueError, match="must be positive"):
        smart_resize(0, 10, NativeResolution())
    with pytest.raises(ValueError, match="min_pixels .* is larger than max_pixels"):
        NativeResolution(min_pixels=100, max_pixels=99)


def test_patches_and_grids_equal_transformers() -> None:
    images = [random_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    out = reference(SMALL)(images, return_tensors="pt")
    pixel_values, grid_thw = preprocess_images(images, SMALL)
    assert torch.equal(grid_thw, out["image_grid_thw"])
    assert pixel_values.dtype == out["pixel_values"].dtype == torch.float32
    assert pixel_values.shape == out["pixel_values"].shape
    assert torch.equal(pixel_values, out["pixel_values"])


def test_other_patch_and_merge_sizes_equal_transformers() -> None:
    resolution = NativeResolution(
        patch_size=8, merge_size=3, temporal_patch_size=3, min_pixels=600, max_pixels=5000
    )
    images = [random_image(h, w, seed) for seed, (h, w) in enumerate([(50, 70), (90, 30)])]
    out = reference(resolution)(images, return_tensors="pt")
    pixel_values, grid_thw = preprocess_images(images, resolution)
    assert torch.equal(grid_thw, out["image_grid_thw"])
    assert torch.equal(pixel_values, out["pixel_values"])


def test_token_counts() -> None:
    """One token per merge window: the processor expands each image to grid.prod() / merge**2 pads."""
    for seed, (height, width) in enumerate(SIZES):
        item = preprocess_image(random_image(height, width, seed), SMALL)
        t, h, w = item.grid_thw
        assert item.pixel_values.shape == (t * h * w, 3 * 2 * 14 * 14)
        assert item.num_tokens == t * h * w // 4
    assert num_vision_tokens((2, 4, 6), 2) == 12
    with pytest.raises(ValueError, match="multiples of merge_size 2"):
        num_vision_tokens((1, 3, 4), 2)


def test_patch_layout_by_hand() -> None:
    """An image already at its target size (Pillow's resize is then a copy): patch n of merge window
    (row R, column C), sub-patch (i, j), holds pixels [(2R + i) * 14 + y, (2C + j) * 14 + x] for every
    channel and both (identical) frames, windows in raster order."""
    height, width = 56, 84  # a 2 x 3 grid of merge windows
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    item = preprocess_image(Image.fromarray(pixels), NativeResolution(min_pixels=1, max_pixels=10_000))
    assert item.grid_thw == (1, 4, 6)
    normalized = (pixels.astype(np.float64) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    patches = item.pixel_values.reshape(-1, 3, 2, 14, 14).double().numpy()
    index = 0
    for window_row in range(2):
        for window_col in range(3):
            for i in range(2):
                for j in range(2):
                    top, left = (2 * window_row + i) * 14, (2 * window_col + j) * 14
                    expected = normalized[top : top + 14, left : left + 14].transpose(2, 0, 1)  # [3, 14, 14]
                    for frame in range(2):
                        np.testing.assert_allclose(patches[index, :, frame], expected, rtol=0, atol=1e-5)
                    index += 1
    assert index == patches.shape[0]


def test_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="expected an RGB image.*'L'"):
        preprocess_image(Image.new("L", (30, 30)), SMALL)
