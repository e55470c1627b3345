"""LLaVA-NeXT any-resolution preprocessing: one image -> its base image and tiles, normalized.

The rule is LlavaNextImageProcessor's (megamm.config.anyres has the arithmetic): the image is
resized bicubically, aspect kept, to fit the best pinpoint (the side that fills it exactly, the
other `ceil`ed), centered on a black canvas of the pinpoint's size (the odd pixel of padding at
the bottom / right), and cut into tiles row by row; the base image is the whole image squashed to
one tile, and goes first. The padding is black in pixels (normalized it is `-mean / std`, not 0)
because that is what the checkpoints were trained on; the model cuts the padded features away
again (the spatial unpad), so only the tiles' borders see it.

Everything but the last step works on PIL images, as megamm.data.images does, so the pixels are
Pillow's bicubic ones, those of transformers' PIL processor (`LlavaNextImageProcessorPil`).
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from megamm.config.anyres import Size, select_best_resolution
from megamm.data.images import Normalization, to_rgb, to_tensor


def fit_size(size: Size, target: Size) -> Size:
    """(height, width) of an image of `size` resized into `target` with its aspect kept: the side
    with the smaller scale fills the target, the other is ceiled and capped (transformers'
    `get_patch_output_size`)."""
    height, width = size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def anyres_tiles(img: Image.Image, tile: int, pinpoints: list[Size]) -> list[Image.Image]:
    """The base image then the `rows x cols` tiles (row-major) of `img`, each `tile` x `tile` RGB."""
    img = img if img.mode == "RGB" else to_rgb(img)
    size = (img.height, img.width)
    target_h, target_w = select_best_resolution(size, pinpoints)
    new_h, new_w = fit_size(size, (target_h, target_w))
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(img.resize((new_w, new_h), Image.Resampling.BICUBIC),
                 ((target_w - new_w) // 2, (target_h - new_h) // 2))
    tiles = [canvas.crop((left, top, left + tile, top + tile))
             for top in range(0, target_h, tile) for left in range(0, target_w, tile)]
    return [img.resize((tile, tile), Image.Resampling.BICUBIC), *tiles]


def preprocess_anyres(img: Image.Image, tile: int, pinpoints: list[Size], normalization: Normalization
                      ) -> tuple[torch.Tensor, Size]:
    """One image -> (float32 `[1 + rows * cols, 3, tile, tile]` base image and tiles, normalized with
    the `normalization` family's statistics; its original (height, width), which the model needs to
    lay the tile features out and unpad them)."""
    tiles = anyres_tiles(img, tile, pinpoints)
    return torch.stack([to_tensor(t, tile, normalization) for t in tiles]), (img.height, img.width)
