"""The strict check that a batch's vision-token positions match the images (or videos) it carries.

`input_ids` hold one placeholder id per vision embedding, so a mismatch would silently shift
every later embedding into the wrong position (`masked_scatter` fills positions in order). Fixed-
size towers give every image the same number of tokens; a native-resolution tower gives an image
of grid (t, h, w) `t * h * w / merge^2` tokens. With `per_sample` (the number of images of each
sample) the counts are checked sample by sample, otherwise for the batch; errors name the sample
and both counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megamm.models.patch_grids import grid_list

PerSample = torch.Tensor | Sequence[int] | None


def native_token_counts(grids: torch.Tensor, merge: int) -> list[int]:
    """`[n, 3]` (t, h, w) grids -> the tokens each image (video) gives after the patch merger."""
    return [t * h * w // merge**2 for t, h, w in grid_list(grids)]


def check_vision_tokens(kind: str, positions: torch.Tensor, tokens: Sequence[int], per_sample: PerSample,
                        describe: str) -> None:
    """positions `[b, s]` bool (this kind's placeholder positions); tokens: the embeddings each
    image (video) gives, in batch order; per_sample `[b]` images (videos) per sample or None.
    `describe` says how a count came about, for the message ("x 16 tokens per image")."""
    counts = positions.sum(dim=1).tolist()
    if per_sample is not None:
        numbers = [int(n) for n in per_sample]
        if len(numbers) != len(counts):
            raise ValueError(f"{kind}s_per_sample has {len(numbers)} entries for a batch of {len(counts)}")
        if sum(numbers) != len(tokens):
            raise ValueError(f"{kind}s_per_sample adds up to {sum(numbers)} but the batch holds {len(tokens)} "
                             f"{kind}(s)")
        offset = 0
        for sample, (found, n) in enumerate(zip(counts, numbers)):
            expected = sum(tokens[offset:offset + n])
            if found != expected:
                raise ValueError(f"sample {sample}: {found} {kind}-token positions, but its {n} {kind}(s) "
                                 f"{describe} = {expected}")
            offset += n
        return
    if sum(counts) != sum(tokens):
        raise ValueError(f"the batch has {sum(counts)} {kind}-token positions (per sample: {counts}), but "
                         f"{len(tokens)} {kind}(s) {describe} = {sum(tokens)}")


def check_fixed_tokens(positions: torch.Tensor, num_images: int, per_image: int, per_sample: PerSample) -> None:
    """A fixed-size tower: every image gives `per_image` tokens; without `per_sample`, every
    sample's count must also be a whole number of images."""
    if per_sample is None:
        for sample, found in enumerate(positions.sum(dim=1).tolist()):
            if found % per_image:
                raise ValueError(f"sample {sample}: {found} image-token positions is not a multiple of the "
                                 f"{per_image} tokens per image")
    check_vision_tokens("image", positions, [per_image] * num_images, per_sample, f"x {per_image} tokens per image")
