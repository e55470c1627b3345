"""M-RoPE position ids of the Qwen2-VL family: three rotary positions (temporal, height, width) per token.

Text tokens get the same position on all three axes, counting up as in a text-only model. The tokens
of an image or video (a run of its pad tokens, one per merged 2x2 patch window, in the patch order
of `native_resolution.patchify`) get their place in the merged grid (t, h / merge, w / merge), offset
by the position the run starts at: height and width are `start + row` and `start + column`;
temporal is `start + floor(t_index * interval)`, where the interval is 1 for Qwen2-VL and
`tokens_per_second * second_per_grid` for a Qwen2.5-VL video (temporal positions then follow seconds,
not frames). The next text starts at `start + max(h, w) / merge`.

That is transformers' `get_rope_index` (Qwen2VLModel / Qwen2_5_VLModel) as installed (5.x), which
the tests compare against. transformers 4.x started the text after a vision run at its largest
position + 1 instead; the two agree for images, and for a video unless its temporal positions reach
past its height and width ones.

`mrope_position_delta` is what generation adds to the plain token index of every new token
(`largest position + 1 - sequence length`), and `packed_mrope_position_ids` restarts the positions
for every sample of a packed row, as `megamm.data.packing` restarts the 1-D ones. The training data
computes each sample's positions with `mrope_position_ids` (`megamm.data.native_samples`) and places
them in padded and packed rows (`megamm.data.batching`), which is what `packed_mrope_position_ids`
computes for a whole packed row.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch

Grid = Sequence[int]


def vision_position_ids(
    start: int, grid_thw: Grid, spatial_merge_size: int, interval: torch.Tensor | float = 1
) -> torch.Tensor:
    """`[3, t * (h / merge) * (w / merge)]` positions of one image or video starting at `start`.

    The temporal index is multiplied by `interval` first and truncated to an integer (`.long()`) after,
    so fractional intervals accumulate (0.5 gives 0, 0, 1, 1, ... per temporal patch, not all 0).
    """
    t, h, w = (int(size) for size in grid_thw)
    h, w = h // spatial_merge_size, w // spatial_merge_size
    temporal = (torch.arange(t) * interval).long() + start
    grid = torch.meshgrid(temporal, torch.arange(h) + start, torch.arange(w) + start, indexing="ij")
    return torch.stack(grid).reshape(3, -1)


def _runs(input_ids: Sequence[int], image_token_id: int, video_token_id: int) -> Iterator[tuple[int, int]]:
    """(kind, length) of each maximal run: kind 0 text, 1 image tokens, 2 video tokens."""
    kinds = (1 if token == image_token_id else 2 if token == video_token_id else 0 for token in input_ids)
    for kind, group in itertools.groupby(kinds):
        yield kind, sum(1 for _ in group)


def mrope_position_ids(
    input_ids: Sequence[int] | torch.Tensor,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    image_grid_thw: Sequence[Grid] | torch.Tensor = (),
    video_grid_thw: Sequence[Grid] | torch.Tensor = (),
    second_per_grid_ts: Sequence[float] | torch.Tensor | None = None,
    tokens_per_second: float | None = None,
) -> torch.Tensor:
    """`[3, s]` int64 positions of one sequence `input_ids` `[s]`.

    The images and videos are the runs of `image_token_id` / `video_token_id`, in order; the i-th
    image run must have exactly the token count of `image_grid_thw[i]` (t * h * w / merge**2), and
    likewise for videos (the Qwen template separates consecutive images with <|vision_start|> /
    <|vision_end|>, so runs never touch). Qwen2-VL: leave `tokens_per_second` None. Qwen2.5-VL: give
    its `tokens_per_second` and one `second_per_grid_ts` entry per video (`VideoInput.second_per_grid`).
    ValueError naming the image or video for a count mismatch, a missing grid or an unused one.
    """
    ids = torch.as_tensor(input_ids).tolist()
    grids = {1: [list(map(int, g)) for g in image_grid_thw], 2: [list(map(int, g)) for g in video_grid_thw]}
    if tokens_per_second is not None:
        if second_per_grid_ts is None or len(second_per_grid_ts) != len(grids[2]):
            given = "none" if second_per_grid_ts is None else len(second_per_grid_ts)
            raise ValueError(
                "tokens_per_second needs one second_per_grid_ts entry per video: "
                f"{len(grids[2])} videos, {given} given"
            )
        # float32 as in transformers (the processor's BatchFeature holds second_per_grid_ts as float32),
        # so that positions truncated by .long() match exactly.
        seconds = torch.as_tensor(second_per_grid_ts, dtype=torch.float32)
    used = {1: 0, 2: 0}
    names = {1: "image", 2: "video"}
    parts: list[torch.Tensor] = []
    position = 0
    for kind, length in _runs(ids, image_token_id, video_token_id):
        if kind == 0:
            parts.append(torch.arange(position, position + length).expand(3, -1))
            position += length
            continue
        index = used[kind]
        if index >= len(grids[kind]):
            raise ValueError(
                f"{names[kind]} {index} has tokens but only {len(grids[kind])} {names[kind]} grids are given"
            )
        grid = grids[kind][index]
        expected = grid[0] * grid[1] * grid[2] // spatial_merge_size**2
        if length != expected:
            raise ValueError(
                f"{names[kind]} {index}: {length} {names[kind]} tokens in the sequence, but its grid "
                f"{tuple(grid)} gives {expected} (t*h*w / spatial_merge_size**2)"
            )
        interval: torch.Tensor | float = 1
        if kind == 2 and tokens_per_second is not None:
            interval = tokens_per_second * seconds[index]
        parts.append(vision_position_ids(position, grid, spatial_merge_size, interval))
        position += max(grid[1], grid[2]) // spatial_merge_size
        used[kind] += 1
    for kind in (1, 2):
        if used[kind] != len(grids[kind]):
            raise ValueError(
                f"{len(grids[kind])} {names[kind]} grids given but the sequence has "
                f"{used[kind]} {names[kind]}s"
            )
    if not parts:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(parts, dim=1)


def mrope_position_delta(position_ids: torch.Tensor) -> int:
    """`largest position + 1 - s` of a `[3, s]` sequence: generation gives token s + k the position
    s + k + delta on all three axes (transformers' `mrope_position_deltas`)."""
    return int(position_ids.max()) + 1 - position_ids.shape[1]


def packed_mrope_position_ids(
    input_ids: Sequence[int] | torch.Tensor,
    cu_seqlens: Sequence[int] | torch.Tensor,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    image_grid_thw: Sequence[Grid] | torch.Tensor = (),
    video_grid_thw: Sequence[Grid] | torch.Tensor = (),
    second_per_grid_ts: Sequence[float] | torch.Tensor | None = None,
    tokens_per_second: float | None = None,
) -> torch.Tensor:
    """`[3, capacity]` positions of a packed row `input_ids` `[capacity]` whose samples are
    `[cu_seqlens[i], cu_seqlens[i + 1])` (`megamm.data.packing.packed_sequence`).

    Each sample's positions restart at 0, as if it ran alone; the grids (and `second_per_grid_ts`)
    are those of the whole row in order, each sample taking as many as it has images / videos.
    Padding after `cu_seqlens[-1]` gets position 0, as in the 1-D packed positions.
    """
    ids = torch.as_tensor(input_ids)
    bounds = [int(bound) for bound in torch.as_tensor(cu_seqlens).flatten()]
    if (
        not bounds
        or bounds[0] != 0
        or bounds[-1] > ids.numel()
        or any(b < a for a, b in itertools.pairwise(bounds))
    ):
        raise ValueError(f"cu_seqlens {bounds} must rise from 0 to at most the row length {ids.numel()}")
    image_grids = [list(map(int, g)) for g in image_grid_thw]
    video_grids = [list(map(int, g)) for g in video_grid_thw]
    seconds = None if second_per_grid_ts is None else torch.as_tensor(second_per_grid_ts, dtype=torch.float32)
    positions = torch.zeros(3, ids.numel(), dtype=torch.long)
    images = videos = 0
    for start, end in itertools.pairwise(bounds):
        sample = ids[start:end]
        sample_images = int((sample == image_token_id).sum())
        sample_videos = int((sample == video_token_id).sum())
        # A sample's grids are the next ones whose token counts add up to its image (video) tokens.
        n_images = _grids_for(image_grids[images:], sample_images, spatial_merge_size, "image", start)
        n_videos = _grids_for(video_grids[videos:], sample_videos, spatial_merge_size, "video", start)
        positions[:, start:end] = mrope_position_ids(
            sample,
            image_token_id=image_token_id,
            video_token_id=video_token_id,
            spatial_merge_size=spatial_merge_size,
            image_grid_thw=image_grids[images : images + n_images],
            video_grid_thw=video_grids[videos : videos + n_videos],
            second_per_grid_ts=None if seconds is None else seconds[videos : videos + n_videos],
            tokens_per_second=tokens_per_second,
        )
        images += n_images
        videos += n_videos
    if images != len(image_grids) or videos != len(video_grids):
        raise ValueError(
            f"the row uses {images} of {len(image_grids)} image grids and {videos} of "
            f"{len(video_grids)} video grids"
        )
    return positions


def _grids_for(grids: list[list[int]], tokens: int, merge: int, name: str, start: int) -> int:
    """How many of `grids` (from the first) hold exactly `tokens` tokens; ValueError if none does."""
    total = count = 0
    while total < tokens and count < len(grids):
        t, h, w = grids[count]
        total += t * h * w // merge**2
        count += 1
    if total != tokens:
        raise ValueError(
            f"the sample starting at {start} has {tokens} {name} tokens, which the remaining {name} grids "
            "do not add up to"
        )
    return count


__all__ = ["mrope_position_delta", "mrope_position_ids", "packed_mrope_position_ids", "vision_position_ids"]
