"""Tests for megamm.data.images, on small synthetic images written to tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megamm.data.images import (
    ImageError,
    choose_grid,
    expand_to_square,
    load_image,
    mean_fill,
    preprocess,
    preprocess_tiles,
    resize_center_crop,
    tile_image,
    to_rgb,
    to_tensor,
)
from megamm.models.towers.clip import CLIP
from megamm.models.towers.siglip import SIGLIP

CLIP_MEAN, CLIP_STD = CLIP.image_mean, CLIP.image_std
SIGLIP_MEAN, SIGLIP_STD = SIGLIP.image_mean, SIGLIP.image_std


def _gradient(width: int, height: int) -> Image.Image:
    """Red grows left to right, green top to bottom, blue constant."""
    x = np.linspace(0, 255, width)
    y = np.linspace(0, 255, height)
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[..., 0] = np.rint(x)[None, :]
    arr[..., 1] = np.rint(y)[:, None]
    arr[..., 2] = 50
    return Image.fromarray(arr)


# --- constants and tensors -------------------------------------------------------------------------


def test_normalization_constants() -> None:
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert SIGLIP_MEAN == (0.5, 0.5, 0.5)
    assert SIGLIP_STD == (0.5, 0.5, 0.5)
    assert mean_fill("clip") == (122, 116, 104)
    assert mean_fill("siglip") == (127, 127, 127)
    with pytest.raises(ValueError, match="unknown normalization"):
        mean_fill("imagenet")  # type: ignore[arg-type]


def test_mean_color_normalizes_to_zero() -> None:
    img = Image.new("RGB", (20, 20), mean_fill("clip"))
    t = to_tensor(img, 20, "clip")
    assert t.abs().max() < 0.02
    # SigLIP maps black to -1 and white to +1.
    assert torch.allclose(
        to_tensor(Image.new("RGB", (4, 4), (0, 0, 0)), 4, "siglip"), torch.full((3, 4, 4), -1.0)
    )
    assert torch.allclose(
        to_tensor(Image.new("RGB", (4, 4), (255, 255, 255)), 4, "siglip"), torch.ones(3, 4, 4)
    )


def test_to_tensor_shape_dtype_and_channel_order() -> None:
    img = Image.new("RGB", (30, 17), (255, 0, 0))
    t = to_tensor(img, 24, "clip")
    assert t.shape == (3, 24, 24)
    assert t.dtype == torch.float32
    expected = [(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]]
    for c in range(3):
        assert torch.allclose(t[c], torch.full((24, 24), expected[c]), atol=1e-5)
    # Already the right size: pixels pass through unresampled.
    grad = _gradient(8, 8)
    raw = torch.from_numpy(np.array(grad)).permute(2, 0, 1).float() / 255
    assert torch.allclose(to_tensor(grad, 8, "siglip"), (raw - 0.5) / 0.5)


@pytest.mark.parametrize("mode", ["pad", "crop", "resize"])
@pytest.mark.parametrize("normalization", ["clip", "siglip"])
def test_preprocess_shapes(mode: str, normalization: str) -> None:
    t = preprocess(_gradient(50, 20), 14, mode, normalization)  # type: ignore[arg-type]
    assert t.shape == (3, 14, 14)
    assert t.dtype == torch.float32


def test_preprocess_modes_differ_as_documented() -> None:
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    pad = preprocess(img, 40, "pad", "clip")
    # Rows 0-9 and 30-39 are mean-colored padding (~0), the middle is white (> 1).
    assert pad[:, :8].abs().max() < 0.02 and pad[:, 32:].abs().max() < 0.02
    assert (pad[:, 12:28] > 1.5).all()
    assert (preprocess(img, 40, "crop", "clip") > 1.5).all()
    assert (preprocess(img, 40, "resize", "clip") > 1.5).all()
    with pytest.raises(ValueError, match="unknown preprocess mode"):
        preprocess(img, 40, "stretch", "clip")  # type: ignore[arg-type]


# --- pad / crop ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(40, 20), (20, 40), (41, 20)])
def test_expand_to_square_pads_and_centers(width: int, height: int) -> None:
    img = _gradient(width, height)
    fill = (122, 116, 104)
    out = expand_to_square(img, fill)
    side = max(width, height)
    assert out.size == (side, side)
    assert out.mode == "RGB"
    arr = np.array(out)
    left, top = (side - width) // 2, (side - height) // 2
    assert np.array_equal(arr[top : top + height, left : left + width], np.array(img))
    mask = np.ones((side, side), dtype=bool)
    mask[top : top + height, left : left + width] = False
    assert mask.sum() == side * side - width * height
    assert (arr[mask] == np.array(fill, dtype=np.uint8)).all()
    # Centered: padding on the two sides differs by at most one pixel.
    assert abs((side - width - left) - left) <= 1 and abs((side - height - top) - top) <= 1


def test_expand_to_square_square_is_unchanged() -> None:
    img = _gradient(16, 16)
    assert np.array_equal(np.array(expand_to_square(img, (0, 0, 0))), np.array(img))


def test_resize_center_crop_picks_the_middle() -> None:
    # Three vertical bands; cropping a square from the 3:1 image keeps exactly the middle one.
    arr = np.zeros((20, 60, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:40] = (0, 255, 0)
    arr[:, 40:] = (0, 0, 255)
    out = resize_center_crop(Image.fromarray(arr), 20)
    assert out.size == (20, 20)
    assert (np.array(out) == (0, 255, 0)).all()
    # Tall image, with resizing: the shortest side becomes the crop size, the middle band survives.
    tall = np.zeros((90, 30, 3), dtype=np.uint8)
    tall[:30] = (255, 0, 0)
    tall[30:60] = (0, 255, 0)
    tall[60:] = (0, 0, 255)
    out = np.array(resize_center_crop(Image.fromarray(tall), 10)).astype(int)
    assert out.shape == (10, 10, 3)
    assert (out[2:8, :, 1] > 200).all() and (out[2:8, :, 0] < 50).all() and (out[2:8, :, 2] < 50).all()


# --- loading ---------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "images"
    r.mkdir()
    return r


def test_load_image_rgb_roundtrip(root: Path) -> None:
    img = _gradient(12, 7)
    (root / "sub").mkdir()
    img.save(root / "sub" / "a.png")
    out = load_image("sub/a.png", root)
    assert out.mode == "RGB" and out.size == (12, 7)
    assert np.array_equal(np.array(out), np.array(img))
    # Absolute paths inside the root and harmless `..` that stay inside are accepted.
    assert load_image(root / "sub" / "a.png", root).size == (12, 7)
    assert load_image("sub/../sub/a.png", str(root)).size == (12, 7)


def test_load_image_converts_modes(root: Path) -> None:
    Image.new("L", (4, 4), 77).save(root / "l.png")
    out = load_image("l.png", root)
    assert out.mode == "RGB" and (np.array(out) == 77).all()

    # Palette with a transparent index: transparent pixels become white, opaque ones keep their color.
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * (254 * 3))
    pal.putpixel((0, 0), 1)
    pal.save(root / "p.png", transparency=0)
    arr = np.array(load_image("p.png", root))
    assert arr.shape == (4, 4, 3)
    assert tuple(arr[0, 0]) == (200, 10, 10)
    assert (arr[1:] == 255).all()

    # RGBA: composited over white (not alpha dropped, which would reveal the stored black).
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    rgba.save(root / "rgba.png")
    arr = np.array(load_image("rgba.png", root)).astype(int)
    assert tuple(arr[0, 0]) == (10, 20, 30)
    assert (arr[1:] == 255).all()
    assert all(abs(v - 127) <= 1 for v in arr[0, 1])
    arr = np.array(load_image("rgba.png", root, background=(0, 0, 0)))
    assert (arr[1:] == 0).all()

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(root / "cmyk.tiff")
    out = load_image("cmyk.tiff", root)
    assert out.mode == "RGB" and (np.array(out) == (255, 0, 0)).all()

    # 16-bit grayscale is scaled, not clipped: 0x8080 -> 128.
    Image.fromarray(np.full((4, 4), 0x8080, dtype=np.uint16)).save(root / "g16.png")
    out = load_image("g16.png", root)
    assert out.mode == "RGB" and (np.array(out) == 128).all()


def test_to_rgb_returns_new_rgb_image() -> None:
    img = Image.new("RGB", (2, 2))
    assert to_rgb(img) is not img
    assert to_rgb(Image.new("LA", (2, 2), (9, 255))).getpixel((0, 0)) == (9, 9, 9)


def test_load_image_refuses_escaping_paths(tmp_path: Path, root: Path) -> None:
    outside = tmp_path / "secret.png"
    _gradient(4, 4).save(outside)
    for bad in ["../secret.png", "sub/../../secret.png", str(outside)]:
        with pytest.raises(ImageError, match="outside image root") as info:
            load_image(bad, root)
        assert bad in str(info.value)
    os.symlink(outside, root / "link.png")
    with pytest.raises(ImageError, match="outside image root") as info:
        load_image("link.png", root)
    assert "link.png" in str(info.value)
    # A symlink that stays inside the root is fine.
    _gradient(4, 4).save(root / "inside.png")
    os.symlink(root / "inside.png", root / "ok.png")
    assert load_image("ok.png", root).size == (4, 4)


def test_load_image_missing_file(root: Path) -> None:
    with pytest.raises(ImageError, match=r"'nope\.png' not found"):
        load_image("nope.png", root)
    (root / "dir").mkdir()
    with pytest.raises(ImageError, match="not found"):
        load_image("dir", root)


def test_load_image_truncated_and_corrupt(root: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "full.png")
    data = (root / "full.png").read_bytes()
    (root / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"trunc\.png") as info:
        load_image("trunc.png", root)
    assert isinstance(info.value.__cause__, OSError)

    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "full.jpg")
    data = (root / "full.jpg").read_bytes()
    (root / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"trunc\.jpg"):
        load_image("trunc.jpg", root)

    (root / "garbage.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match=r"garbage\.png") as info:
        load_image("garbage.png", root)
    assert info.value.__cause__ is not None


def test_load_image_max_pixels(root: Path) -> None:
    _gradient(20, 20).save(root / "big.png")
    with pytest.raises(ImageError, match=r"big\.png.*400 pixels.*max_pixels=100"):
        load_image("big.png", root, max_pixels=100)
    assert load_image("big.png", root, max_pixels=400).size == (20, 20)
    assert load_image("big.png", root, max_pixels=None).size == (20, 20)
    # The limit is per call: Pillow's global setting is untouched.
    before = Image.MAX_IMAGE_PIXELS
    load_image("big.png", root, max_pixels=1000)
    assert before == Image.MAX_IMAGE_PIXELS


def test_load_image_pillow_bomb_error_is_image_error(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Beyond Pillow's own hard limit (2 * MAX_IMAGE_PIXELS) Pillow raises before our check can run.
    _gradient(20, 20).save(root / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    with pytest.raises(ImageError, match=r"big\.png") as info:
        load_image("big.png", root, max_pixels=None)
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)


# --- dynamic tiling --------------------------------------------------------------------------------

# Expected grids derived by hand from choose_grid's documented rule, tile_size 448 (448**2 = 200704):
# candidates in order of (tiles, cols); strictly closer aspect wins; an equal one wins only when
# 2 * w * h > 200704 * tiles.


@pytest.mark.parametrize(
    ("width", "height", "max_tiles", "min_tiles", "expected"),
    [
        (1000, 500, 6, 1, (2, 1)),  # aspect 2: (2, 1) is the only exact match within 6 tiles
        (500, 1000, 6, 1, (1, 2)),
        (500, 500, 6, 1, (1, 1)),  # (2, 2) ties, but 500000 <= 802816: too small for it
        (1000, 1000, 6, 1, (2, 2)),  # 2e6 > 802816: large enough for (2, 2); (3, 3) exceeds 6
        (1000, 1000, 12, 1, (3, 3)),  # 2e6 > 200704 * 9 = 1806336 too
        (3000, 1000, 12, 1, (6, 2)),  # (3, 1) and (6, 2) both exact; 6e6 > 200704 * 12
        (600, 200, 12, 1, (3, 1)),  # same aspect, but 240000 <= 200704 * 12
        (600, 400, 2, 1, (2, 1)),  # aspect 1.5 ties (1, 1) and (2, 1); 480000 > 401408
        (300, 200, 2, 1, (1, 1)),  # same tie, 120000 <= 401408
        (500, 500, 4, 2, (2, 2)),  # min_tiles 2 excludes (1, 1); (2, 2) is the exact match
        (10, 1000, 4, 1, (1, 4)),  # very tall: the tallest grid allowed
        (1, 1, 1, 1, (1, 1)),
    ],
)
def test_choose_grid(
    width: int, height: int, max_tiles: int, min_tiles: int, expected: tuple[int, int]
) -> None:
    assert choose_grid(width, height, max_tiles, min_tiles) == expected


def test_choose_grid_tile_size_matters_and_validates() -> None:
    # 500x500 with 224 tiles: 500000 > 50176 * 4 -> (2, 2), where 448 tiles gave (1, 1).
    assert choose_grid(500, 500, 4, tile_size=224) == (2, 2)
    for args in [(0, 10, 4), (10, 10, 0), (10, 10, 2, 3)]:
        with pytest.raises(ValueError, match="must be positive|min_tiles"):
            choose_grid(*args)


def test_tile_image_row_major_with_thumbnail() -> None:
    img = _gradient(1200, 800)  # aspect 1.5 -> exact (3, 2) with max_tiles 6
    tile = 32
    tiles = tile_image(img, tile, max_tiles=6)
    assert len(tiles) == 3 * 2 + 1
    assert all(t.size == (tile, tile) and t.mode == "RGB" for t in tiles)
    for k, t in enumerate(tiles[:6]):
        row, col = divmod(k, 3)
        mean = np.array(t).reshape(-1, 3).mean(axis=0)
        # Red encodes x and green y: tile k must come from column k % 3, row k // 3.
        assert abs(mean[0] - (col + 0.5) / 3 * 255) < 8, (k, mean)
        assert abs(mean[1] - (row + 0.5) / 2 * 255) < 8, (k, mean)
    top_right = np.array(tiles[2]).astype(int)
    assert top_right[..., 0].min() > 160 and top_right[..., 1].max() < 130
    assert np.array_equal(np.array(tiles[-1]), np.array(img.resize((tile, tile), Image.Resampling.BICUBIC)))

    assert len(tile_image(img, tile, max_tiles=6, thumbnail=False)) == 6


def test_tile_image_single_tile_has_no_thumbnail() -> None:
    tiles = tile_image(_gradient(100, 100), 448, max_tiles=6)
    assert len(tiles) == 1 and tiles[0].size == (448, 448)


def test_preprocess_tiles() -> None:
    img = _gradient(1200, 800)
    tiles, grid = preprocess_tiles(img, 32, 6, "siglip")
    assert grid == (3, 2)
    assert tiles.shape == (7, 3, 32, 32) and tiles.dtype == torch.float32
    assert torch.allclose(tiles[2], to_tensor(tile_image(img, 32, 6)[2], 32, "siglip"))
    tiles, grid = preprocess_tiles(img.convert("RGBA"), 32, 6, "clip", thumbnail=False)
    assert grid == (3, 2) and tiles.shape == (6, 3, 32, 32)
