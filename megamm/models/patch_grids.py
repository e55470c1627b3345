"""Where each patch of a native-resolution microbatch sits: positions, attention segments, windows.

A microbatch is every image's patches in one sequence, image after image, each image's `(t, h, w)`
grid in the order the image processor emits them (megamm.data.native_resolution): frame by frame,
and inside a frame merge block by merge block (each `m x m` block of patches contiguous, blocks
row-major). All functions here are pure functions of the grids `[images, 3]`; they compute what
Hugging Face's vision utilities compute (get_vision_position_ids, get_vision_cu_seqlens,
get_vision_window_index), written as segments and permutations instead of padded index tricks.
"""

from __future__ import annotations

import torch


def grid_list(grids: torch.Tensor) -> list[tuple[int, int, int]]:
    """`[images, 3]` (t, h, w) -> a list of int triples (one host sync, done once per forward)."""
    if grids.dim() != 2 or grids.shape[1] != 3:
        raise ValueError(f"grids must be [images, 3] (t, h, w), got shape {tuple(grids.shape)}")
    return [(int(t), int(h), int(w)) for t, h, w in grids.tolist()]


def patch_positions(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """`[patches, 2]` (row, column) of every patch in the merge-block order; frames repeat them."""
    out = []
    for t, h, w in grids:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(blocks).transpose(1, 2).flatten()
        cols = cols.reshape(blocks).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


def frame_lengths(grids: list[tuple[int, int, int]]) -> list[int]:
    """Patches of each attention segment in full attention: one frame (a video's frames do not
    attend to each other, as in Hugging Face's Qwen2-VL)."""
    return [h * w for t, h, w in grids for _ in range(t)]


def window_order(grids: list[tuple[int, int, int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """The window reordering of the merged tokens and the window lengths in patches.

    Returns (order `[patches / merge^2]`: for each position of the window-ordered sequence, the
    merged token it holds; window lengths). Windows tile each frame's merged grid in `window x
    window` squares, row-major (the last row and column of windows may be cut short); tokens inside
    a window stay row-major. Frames stay in order, so a frame is a run of whole windows.
    """
    order, lengths, offset = [], [], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).view(t, gh, gw) + offset
        for frame in range(t):
            for top in range(0, gh, window):
                for left in range(0, gw, window):
                    tile = index[frame, top:top + window, left:left + window].flatten()
                    order.append(tile)
                    lengths.append(tile.numel() * merge * merge)
        offset += t * gh * gw
    return torch.cat(order), lengths


def expand_to_patches(order: torch.Tensor, unit: int) -> torch.Tensor:
    """A permutation of merged tokens -> the same permutation of their `unit` patches each."""
    return (order[:, None] * unit + torch.arange(unit, device=order.device)).flatten()
