"""One rank's samples of an iteration -> its microbatches, padded or packed.

Padded (default): each sample is one row of `seq_length` tokens (pad id, label -100 after it);
microbatches of `micro_batch_size` rows. Keys: input_ids, labels `[b, s]`, pixel_values `[n, 3, H, W]`
or None, images_per_sample `[b]` (vision-tower inputs per row, tiles counted; images for the
native-resolution family).

Packed (`--pack-sequences`): the same samples are bin-packed (first-fit decreasing, C++ when built)
into as few rows as possible, so a step trains on exactly the samples the padded step would (same
loss, since the loss is the per-token mean over the global batch) in fewer rows. Each row also carries
position_ids `[b, s]` restarting per sample and segment_ids `[b, s]` (the sample of every token,
`megamm.data.packing.segment_ids`: attention is block-diagonal causal over them, the O(s) form of
`block_causal_mask`), which every pipeline stage needs. The row count is rounded up
with empty rows (all padding, no loss) to whole microbatches, and to a multiple of `microbatch_multiple`
microbatches (the interleaved pipeline schedule needs a multiple of the pipeline size).

Images stay in token order within a row: a packed row's images are its samples' images in the order
the samples are placed in the row.

Any-resolution samples (LLaVA-NeXT, `Sample.image_sizes`): pixel_values are every image's base image
and tiles, image_sizes `[n_images, 2]` each image's (height, width) (None when the microbatch has no
image), and images_per_sample counts images, not tiles (the model computes each image's tokens from
its size); batch_num_images `[samples]` the images of each sample, a packed row's samples in row
order (LLaVA-OneVision tiles only a sample's lone image, and a packed row's images_per_sample counts
several samples'). LLaVA-OneVision's videos: pixel_values_videos `[videos, frames, C, H, W]` (None
without videos; every video of a run has the same frame count, `megamm.data.anyres_videos`, which
the model needs within a microbatch) and videos_per_sample `[b]`.

Native-resolution towers (the Qwen2-VL family; `image_shape` is then `(C * T * P * P,)`, one patch):
pixel_values are the images' patches `[total image patches, C*T*P*P]`, with image_grid_thw
`[n_images, 3]`; pixel_values_videos / video_grid_thw the same for videos (each None when the
microbatch has none), videos_per_sample `[b]`; and position_ids are the `[3, b, s]` M-RoPE positions
in padded rows too, since text positions after an image are not the token index. They are each
sample's own (`NativeVision.position_ids`): a packed row restarts them at every sample (padding 0, as
the 1-D packed positions), a padded row continues the text positions over its padding, which is
what transformers' `get_rope_index` gives the padded row without an attention mask.
"""

from __future__ import annotations

import torch

from megamm.config.constants import IGNORE_INDEX
from megamm.data.packing import pack_first_fit_decreasing, packed_sequence, segment_ids
from megamm.data.samples import Sample

Batch = dict[str, torch.Tensor | None]
# The keys a native-resolution microbatch adds (position_ids is also a packed row's key).
NATIVE_KEYS = ("image_grid_thw", "pixel_values_videos", "video_grid_thw", "videos_per_sample", "position_ids")


def is_native(image_shape: tuple[int, ...]) -> bool:
    """Whether `image_shape`, one vision-tower input, is a native-resolution tower's patch `(C*T*P*P,)`
    rather than an image `(C, H, W)`."""
    return len(image_shape) == 1


def _cat_or_none(parts: list[torch.Tensor]) -> torch.Tensor | None:
    parts = [part for part in parts if part.shape[0]]
    return torch.cat(parts) if parts else None


def _native_inputs(rows: list[list[Sample]], seq_length: int, packed: bool, patch_dim: int) -> Batch:
    """The native-resolution keys but pixel_values (see the module docstring): grids, videos, positions."""
    for row in rows:
        for sample in row:
            if sample.native is None:
                raise ValueError(f"sample {sample.sample_id!r} has no native-resolution inputs (grids, positions); "
                                 "it was built for a fixed-size vision tower")
    samples = [sample for row in rows for sample in row]
    positions = torch.zeros(3, len(rows), seq_length, dtype=torch.long)
    for number, row in enumerate(rows):
        start = 0
        for sample in row:
            positions[:, number, start : start + len(sample)] = sample.native.position_ids
            start += len(sample)
        if not packed and start:
            positions[:, number, start:] = positions[0, number, start - 1] + 1 + torch.arange(seq_length - start)
    videos = _cat_or_none([s.native.pixel_values_videos for s in samples])
    if videos is not None and videos.shape[1] != patch_dim:
        raise ValueError(f"video patches of {videos.shape[1]} values, the vision tower takes {patch_dim}")
    return {
        "image_grid_thw": _cat_or_none([s.native.image_grid_thw for s in samples]),
        "pixel_values_videos": videos,
        "video_grid_thw": _cat_or_none([s.native.video_grid_thw for s in samples]),
        "videos_per_sample": torch.tensor([sum(s.num_videos for s in row) for row in rows], dtype=torch.long),
        "position_ids": positions,
    }


def _anyres(rows: list[list[Sample]]) -> bool:
    """Whether the rows hold any-resolution samples (a sample of another kind among them is refused)."""
    kinds = {s.image_sizes is not None for row in rows for s in row}
    if len(kinds) > 1:
        raise ValueError("a microbatch mixes any-resolution samples (with image sizes) and samples of another kind")
    return kinds == {True}


def _anyres_keys(rows: list[list[Sample]]) -> Batch:
    """Any-resolution rows' image_sizes `[n_images, 2]` (height, width; None without images) and
    batch_num_images `[samples]` (see the module docstring)."""
    sizes = [size for row in rows for s in row for size in s.image_sizes]
    return {"image_sizes": torch.tensor(sizes, dtype=torch.long) if sizes else None,
            "batch_num_images": torch.tensor([len(s.image_sizes) for row in rows for s in row], dtype=torch.long)}


def _anyres_videos(rows: list[list[Sample]]) -> Batch:
    """pixel_values_videos `[videos, frames, C, H, W]` of the rows' videos in token order (None
    without videos) and videos_per_sample `[b]`; ValueError when their frame counts differ."""
    videos = [s.pixel_values_videos for row in rows for s in row if s.pixel_values_videos is not None]
    frames = sorted({int(video.shape[1]) for video in videos})
    if len(frames) > 1:
        raise ValueError(f"a microbatch's videos have {frames} frames; the model takes one frame count per "
                         "microbatch (every video of a run gives the same number)")
    return {"pixel_values_videos": torch.cat(videos) if videos else None,
            "videos_per_sample": torch.tensor([sum(s.num_videos for s in row) for row in rows], dtype=torch.long)}


def _images(rows: list[list[Sample]], image_shape: tuple[int, ...]) -> tuple[torch.Tensor | None, torch.Tensor]:
    anyres = _anyres(rows)
    per_row = torch.tensor([sum(len(s.image_sizes) if anyres else s.num_images for s in row) for row in rows],
                           dtype=torch.long)
    pixels = [s.pixel_values for row in rows for s in row if s.num_images]
    if not pixels:
        return None, per_row
    stacked = torch.cat(pixels)
    if tuple(stacked.shape[1:]) != image_shape:
        raise ValueError(f"images of shape {tuple(stacked.shape[1:])}, the vision tower takes {image_shape}")
    return stacked, per_row


def padded_batch(samples: list[Sample], seq_length: int, pad_id: int, image_shape: tuple[int, ...]) -> Batch:
    """One microbatch, a row per sample, padded to `seq_length`."""
    input_ids = torch.full((len(samples), seq_length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), seq_length), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        if len(sample) > seq_length:
            raise ValueError(f"sample {sample.sample_id!r} has {len(sample)} tokens, more than {seq_length}")
        input_ids[row, : len(sample)] = torch.tensor(sample.input_ids)
        labels[row, : len(sample)] = torch.tensor(sample.labels)
    pixel_values, per_row = _images([[s] for s in samples], image_shape)
    batch = {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values, "images_per_sample": per_row}
    if is_native(image_shape):
        batch.update(_native_inputs([[s] for s in samples], seq_length, False, image_shape[0]))
    if _anyres([[s] for s in samples]):
        batch.update(_anyres_keys([[s] for s in samples]))
        batch.update(_anyres_videos([[s] for s in samples]))
    return batch


def padded_microbatches(
    samples: list[Sample], micro_batch_size: int, seq_length: int, pad_id: int, image_shape: tuple[int, ...]
) -> list[Batch]:
    return [
        padded_batch(samples[i : i + micro_batch_size], seq_length, pad_id, image_shape)
        for i in range(0, len(samples), micro_batch_size)
    ]


def packed_microbatches(
    samples: list[Sample],
    micro_batch_size: int,
    seq_length: int,
    pad_id: int,
    image_shape: tuple[int, ...],
    microbatch_multiple: int = 1,
) -> list[Batch]:
    """The samples packed into rows of `seq_length`, grouped into microbatches (see the module docstring)."""
    bins = pack_first_fit_decreasing([len(s) for s in samples], seq_length)
    unit = micro_batch_size * microbatch_multiple
    rows = [[samples[i] for i in members] for members in bins]
    rows += [[] for _ in range(-len(rows) % unit)]
    batches = []
    for start in range(0, len(rows), micro_batch_size):
        group = rows[start : start + micro_batch_size]
        packed = [
            packed_sequence([{"input_ids": s.input_ids, "labels": s.labels} for s in row], seq_length, pad_id)
            for row in group
        ]
        pixel_values, per_row = _images(group, image_shape)
        batch = {
            "input_ids": torch.stack([p["input_ids"] for p in packed]),
            "labels": torch.stack([p["labels"] for p in packed]),
            "position_ids": torch.stack([p["position_ids"] for p in packed]),
            "segment_ids": torch.stack([segment_ids(p["cu_seqlens"], seq_length) for p in packed]),
            "pixel_values": pixel_values,
            "images_per_sample": per_row,
        }
        if is_native(image_shape):
            batch.update(_native_inputs(group, seq_length, True, image_shape[0]))
        if _anyres(group):
            batch.update(_anyres_keys(group))
            batch.update(_anyres_videos(group))
        batches.append(batch)
    return batches
