"""Image loading and preprocessing for LLaVA-style vision towers (CLIP / SigLIP ViTs).

Everything here works on PIL images until the last step, which turns an RGB image into a float32
tensor of shape [3, size, size] (`size` is `VisionConfig.image_size`), scaled to [0, 1] and normalized
with the vision tower's mean/std. Three single-image modes are offered (`preprocess`):

* "pad"    - LLaVA-1.5: pad to a square with the mean color, then resize. Keeps the whole image and its
             aspect ratio; the padding normalizes to ~0, so it carries (almost) no signal.
* "crop"   - CLIP's own processor: resize the shortest side, center crop. Loses the borders of
             non-square images.
* "resize" - squash to size x size (SigLIP's processor). Keeps everything, distorts the aspect ratio.

For high-resolution inputs, `tile_image` / `preprocess_tiles` cut the image into a grid of tiles
(InternVL / LLaVA-NeXT "dynamic resolution"), plus an optional global thumbnail.

Loading (`load_image`) is hardened for untrusted datasets: paths may not escape the image root, huge
images are refused before their pixels are decoded, and truncated or corrupt files raise `ImageError`
naming the file instead of a bare Pillow exception from deep inside a data loader worker.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from megamm.config import VisionConfig
from megamm.config.registry import VISION_TOWERS
from megamm.models.towers import tower_family

# Image statistics are named by vision tower family (megamm.config.registry.VISION_TOWERS).
Normalization = str
PreprocessMode = Literal["pad", "crop", "resize"]
RGB = tuple[int, int, int]


# 64 megapixels (e.g. 8000 x 8000) is far above anything a ViT needs, yet allows real photographs and
# scans. Decoding it as RGB takes 192 MiB, a bound a data loader worker can afford.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
WHITE: RGB = (255, 255, 255)
# InternVL's tile size; only used by `choose_grid`'s tie-break when no tile size is given.
DEFAULT_TILE_SIZE = 448

# Pillow's decoders raise a variety of exception types on malformed input (OSError mostly, but fuzzing
# has found SyntaxError, struct.error, IndexError, ...). All of them mean "this file is unusable".
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    TypeError,
    IndexError,
    KeyError,
    struct.error,
    Image.DecompressionBombError,
)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


class ImageError(ValueError):
    """An image that cannot be used: outside the image root, missing, too large, truncated or corrupt."""


def image_normalization(vision: VisionConfig, requested: str | None) -> Normalization:
    """The statistics to normalize with: `requested` (a flag or config field), else the tower family's."""
    return requested or vision.family


def float_tile_ratios(vision: VisionConfig) -> bool:
    """Whether tiles are chosen by float ratios (`choose_grid`), as the tower family's Hugging Face
    image processor does (InternViT: transformers' GotOcr2 processor), rather than exactly."""
    return tower_family(vision.family).float_tile_ratios


def _mean_std(normalization: Normalization) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The mean and std of the vision tower family named `normalization`."""
    if normalization not in VISION_TOWERS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {VISION_TOWERS.names()}")
    family = tower_family(normalization)
    return family.image_mean, family.image_std


def mean_fill(normalization: Normalization) -> RGB:
    """The mean color as 0-255 ints, truncated like LLaVA's `tuple(int(x * 255) for x in image_mean)`.

    CLIP gives (122, 116, 104), SigLIP (127, 127, 127). Truncation (not rounding) matches LLaVA's
    checkpoints, which were trained on exactly these padding values.
    """
    mean, _ = _mean_std(normalization)
    r, g, b = (int(x * 255) for x in mean)
    return r, g, b


def resolve_image_path(path: str | os.PathLike[str], image_root: str | os.PathLike[str]) -> Path:
    """Resolve `path` (relative to `image_root`, or absolute) and refuse anything outside the root.

    Both sides are fully resolved (symlinks, `..`), so `../x.png`, an absolute path elsewhere and a
    symlink inside the root pointing outside are all refused. An absolute path inside the root is
    accepted. The check is made on the resolved path, which is then the one opened, so a symlink cannot
    redirect the open after the check (only swapping a directory on the resolved path could).

    Raises:
        ImageError: naming `path`, if it escapes the root or does not name an existing file.
    """
    root = Path(image_root).resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise ImageError(f"image path {os.fspath(path)!r} resolves to {resolved}, outside image root {root}")
    if not resolved.is_file():
        raise ImageError(f"image file {os.fspath(path)!r} not found (looked at {resolved})")
    return resolved


def to_rgb(img: Image.Image, background: RGB = WHITE) -> Image.Image:
    """Convert an image of any Pillow mode to RGB.

    * Transparency (an alpha channel, or a palette/`tRNS` transparent color) is composited over
      `background`, white by default. White is what image viewers and browsers show behind transparent
      PNGs (logos, diagrams, dark text), and it is what Hugging Face's `convert_to_rgb` does, so models
      trained through HF processors saw white. Simply dropping alpha (`img.convert("RGB")`) would
      expose whatever color the transparent pixels happen to store, often black.
    * 16-bit grayscale ("I;16*", and "I" as Pillow opens 16-bit PNG/TIFF) is scaled by 1/257 to 8 bits;
      Pillow's own conversion would clip everything above 255 to white.
    * Everything else (L, 1, P, CMYK, YCbCr, ...) uses Pillow's conversion. CMYK uses Pillow's naive
      formula: ICC profiles are ignored, as LLaVA's and HF's pipelines ignore them.

    Returns a new RGB image (never `img` itself).
    """
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if img.mode in _SIXTEEN_BIT_MODES:
        levels = np.asarray(img, dtype=np.float64) / 257.0
        gray = np.clip(np.rint(levels), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return img.convert("RGB")


def load_image(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: RGB = WHITE,
) -> Image.Image:
    """Load `path` (under `image_root`) as a fully decoded RGB image.

    Args:
        path: relative to `image_root`, or absolute (must still lie inside it).
        image_root: the directory every image must resolve into (see `resolve_image_path`).
        max_pixels: refuse images with more than this many pixels (width * height), checked from the
            header before any pixel data is decoded, so a decompression bomb costs nothing. None turns
            this check off. Pillow's global hard limit (2 * `Image.MAX_IMAGE_PIXELS`) still applies, as
            this function never changes Pillow's global settings; its error is turned into ImageError
            too, and its DecompressionBombWarning is silenced for the duration of the call (our own
            limit replaces it).
        background: the color transparent pixels are composited over (see `to_rgb`).

    Multi-frame files (GIF, APNG, TIFF) yield their first frame. EXIF orientation is not applied, like
    LLaVA's `Image.open(...).convert("RGB")`.

    Raises:
        ImageError: naming the file, for a path outside the root, a missing file, an image above
            `max_pixels`, or a file Pillow cannot fully decode (truncated, corrupt, unknown format);
            Pillow's exception is chained as the cause.
    """
    resolved = resolve_image_path(path, image_root)
    return _decode(resolved, f"{os.fspath(path)!r} ({resolved})", max_pixels, background)


def load_image_bytes(
    data: bytes,
    name: str,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: RGB = WHITE,
) -> Image.Image:
    """`load_image` for an encoded file held in memory (a tar shard member); `name` is used in errors.

    Raises ImageError naming `name` exactly as `load_image` does for a file.
    """
    return _decode(io.BytesIO(data), repr(name), max_pixels, background)


def _decode(
    source: Path | io.BytesIO, name: str, max_pixels: int | None, background: RGB
) -> Image.Image:
    """Open, check the pixel count from the header, fully decode and convert to RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageError(
                        f"image {name} is {width}x{height} = {width * height} pixels, more than "
                        f"max_pixels={max_pixels} (possible decompression bomb)"
                    )
                # Decode now, while the file is open: truncation and corruption surface here, not later
                # in a resize.
                img.load()
                return to_rgb(img, background)
    except _DECODE_ERRORS as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e


def image_size(source: str | os.PathLike[str] | bytes, name: str) -> tuple[int, int]:
    """(width, height) of an image file path (already resolved, as `SampleBuilder` passes it) or of
    encoded bytes, from the header only: no pixel data is decoded (the cheap probe the vision-work
    balancing uses, megamm.data.balance). ImageError naming `name` when the header is unreadable."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as img:
                return img.size
    except _DECODE_ERRORS as e:
        raise ImageError(f"cannot read the header of image {name}: {type(e).__name__}: {e}") from e


def expand_to_square(img: Image.Image, fill: RGB) -> Image.Image:
    """Pad `img` (RGB) to a max(w, h) square of color `fill`, the image centered (LLaVA's `expand2square`).

    When the difference is odd the extra padding row/column goes to the bottom/right, as in LLaVA
    (offset `(max - min) // 2`). Padding rather than cropping keeps the whole image and its aspect
    ratio; with `fill = mean_fill(normalization)` the padding normalizes to ~0. Returns `img` itself
    when it is already square.
    """
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), fill)
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shortest side is `size` (bicubic), then center crop size x size (CLIP's processor).

    The long side becomes `int(size * long / short)` (truncated, as in HF's CLIP processor); the crop
    starts at `(new_long - size) // 2`. Bicubic is what CLIP and LLaVA use, so features match.
    """
    width, height = img.size
    if width <= height:
        new_size = (size, max(size, int(size * height / width)))
    else:
        new_size = (max(size, int(size * width / height)), size)
    if new_size != img.size:
        img = img.resize(new_size, Image.Resampling.BICUBIC)
    left = (new_size[0] - size) // 2
    top = (new_size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image, size: int, normalization: Normalization) -> torch.Tensor:
    """An image as a normalized float32 tensor [3, size, size].

    Resizes to size x size (bicubic) unless already that size; converts to RGB first if needed (see
    `to_rgb`). Values are `(pixel / 255 - mean) / std` per channel, channels first as the ViT's patch
    convolution expects.
    """
    mean, std = _mean_std(normalization)
    if img.mode != "RGB":
        img = to_rgb(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    # NumPy, not torch: the same float32 operations (so the same bits), but single-threaded. In the
    # training process torch's intra-op threads would compete with the training's own, which made this
    # step several times slower on a busy machine.
    pixels = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    mean_array = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std_array = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return torch.from_numpy(np.ascontiguousarray((pixels - mean_array) / std_array))


def preprocess(
    img: Image.Image, size: int, mode: PreprocessMode, normalization: Normalization
) -> torch.Tensor:
    """One image -> float32 tensor [3, size, size] for a ViT with `image_size == size`.

    `mode` is "pad" (LLaVA-1.5: pad to square with the mean color, then resize), "crop" (shortest side to
    `size`, center crop) or "resize" (squash to size x size); see the module docstring for the trade-offs.
    The choice must match what the checkpoint was trained with.
    """
    img = img if img.mode == "RGB" else to_rgb(img)
    if mode == "pad":
        img = expand_to_square(img, mean_fill(normalization))
    elif mode == "crop":
        img = resize_center_crop(img, size)
    elif mode != "resize":
        raise ValueError(f"unknown preprocess mode {mode!r}; expected 'pad', 'crop' or 'resize'")
    return to_tensor(img, size, normalization)


def choose_grid(
    width: int,
    height: int,
    max_tiles: int,
    min_tiles: int = 1,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    float_ratios: bool = False,
) -> tuple[int, int]:
    """The (cols, rows) tile grid whose aspect ratio best matches a width x height image (InternVL's rule).

    Candidates are all grids with min_tiles <= cols * rows <= max_tiles, scanned in order of increasing
    tile count, then increasing cols. The first candidate is the initial best; each later candidate g
    replaces the best when

    * |width/height - cols/rows| is strictly smaller than the best's, or
    * it is equal and the image is large enough for g: width * height > 0.5 * tile_size**2 * cols * rows
      (at least half of g's pixels would come from the image rather than upsampling).

    So an exact aspect match with few tiles is kept for small images, and more tiles are used only when
    the image has the resolution to fill them (a 1000x1000 image with 448 tiles gets 3x3 if allowed, a
    500x500 one stays 1x1). This is InternVL's `find_closest_aspect_ratio` with two fixes that make it
    deterministic: ratios are compared as exact fractions (no float ties), and grids with the same tile
    count are ordered by cols (InternVL's order there depends on set iteration).

    `float_ratios` compares the ratios as floats instead, as transformers' GotOcr2 / InternVL image
    processors do (`get_optimal_tiled_canvas`), so a model converted from them sees their grids: float
    rounding breaks some exact ties (a 700x600 image with up to 12 tiles: 7/6 is 1/6 from both 1/1 and
    4/3, but in floats 4/3 is nearer, so 4x3 wins where the exact rule gives 2x2).

    Returns:
        (cols, rows): the image is later resized to (cols * tile_size, rows * tile_size).
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(
            f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}"
        )
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    aspect = width / height if float_ratios else Fraction(width, height)
    ratio = (lambda cols, rows: cols / rows) if float_ratios else Fraction
    candidates = sorted(
        (
            (cols, rows)
            for cols in range(1, max_tiles + 1)
            for rows in range(1, max_tiles // cols + 1)
            if cols * rows >= min_tiles
        ),
        key=lambda grid: (grid[0] * grid[1], grid[0]),
    )
    best = candidates[0]
    best_diff = abs(aspect - ratio(*best))
    for cols, rows in candidates[1:]:
        diff = abs(aspect - ratio(cols, rows))
        # Integer form of width * height > 0.5 * tile_size**2 * cols * rows.
        if diff < best_diff or (diff == best_diff and 2 * width * height > tile_size**2 * cols * rows):
            best, best_diff = (cols, rows), diff
    return best


def tile_count(grid: tuple[int, int], thumbnail: bool) -> int:
    """Vision-tower inputs of an image cut into `grid` (cols, rows): the tiles, plus the thumbnail
    when asked for and there is more than one tile."""
    tiles = grid[0] * grid[1]
    return tiles + 1 if thumbnail and tiles > 1 else tiles


def _cut_tiles(img: Image.Image, grid: tuple[int, int], tile_size: int, thumbnail: bool) -> list[Image.Image]:
    cols, rows = grid
    resized = img.resize((cols * tile_size, rows * tile_size), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if tile_count(grid, thumbnail) > len(tiles):
        tiles.append(img.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


def tile_image(
    img: Image.Image,
    tile_size: int,
    max_tiles: int,
    thumbnail: bool = True,
    min_tiles: int = 1,
    float_ratios: bool = False,
) -> list[Image.Image]:
    """Cut `img` into a dynamic grid of tile_size x tile_size tiles (InternVL / LLaVA-NeXT style).

    The grid is `choose_grid(w, h, max_tiles, min_tiles, tile_size=tile_size)`. The image is resized
    (bicubic, aspect slightly adjusted to the grid's) to (cols * tile_size, rows * tile_size) and cut
    into cols * rows tiles in row-major order (left to right, then top to bottom), the order the
    language model reads them in. When `thumbnail` and there is more than one tile, the whole image
    resized to tile_size x tile_size is appended last, giving the model global context that single tiles
    lack. Returns cols * rows (+ 1) images.
    """
    grid = choose_grid(img.width, img.height, max_tiles, min_tiles, tile_size=tile_size, float_ratios=float_ratios)
    return _cut_tiles(img, grid, tile_size, thumbnail)


def preprocess_tiles(
    img: Image.Image,
    tile_size: int,
    max_tiles: int,
    normalization: Normalization,
    thumbnail: bool = True,
    min_tiles: int = 1,
    float_ratios: bool = False,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tile `img` (see `tile_image`) and normalize every tile.

    Returns:
        tiles: float32 [n_tiles, 3, tile_size, tile_size], n_tiles = cols * rows (+ 1 thumbnail, last).
        grid: (cols, rows), needed to lay the tiles' features back out (e.g. LLaVA-NeXT's newline tokens).
    """
    img = img if img.mode == "RGB" else to_rgb(img)
    grid = choose_grid(img.width, img.height, max_tiles, min_tiles, tile_size=tile_size, float_ratios=float_ratios)
    tiles = _cut_tiles(img, grid, tile_size, thumbnail)
    return torch.stack([to_tensor(tile, tile_size, normalization) for tile in tiles]), grid
