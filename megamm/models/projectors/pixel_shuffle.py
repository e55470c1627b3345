"""Pixel shuffle: merge each block of patches into one token, before any projector."""

from __future__ import annotations

import torch

from megamm.config.model import PIXEL_SHUFFLE_BLOCK


def pixel_shuffle(features: torch.Tensor, grid: int, block: int = PIXEL_SHUFFLE_BLOCK) -> torch.Tensor:
    """Merge each `block x block` group of patches: `[g*g, n, c] -> [(g/block)^2, n, block^2 c]`.

    The merged token at block (i, j) concatenates its patches row-major within the block: for
    block 2, (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1).
    """
    tokens, n, c = features.shape
    if tokens != grid * grid or grid % block:
        raise ValueError(f"pixel shuffle needs a square grid divisible by {block}, got {tokens} tokens for grid {grid}")
    merged = grid // block
    x = features.permute(1, 0, 2).reshape(n, merged, block, merged, block, c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(n, merged * merged, block * block * c)
    return x.transpose(0, 1).contiguous()
