"""A deterministic synthetic multimodal dataset for tests, benchmarks and `--mock-data` runs.

Sample i depends only on (seed, i). It is learnable, so a falling loss means training works:

    [BOS] ( [IMG] x tokens_per_image  [COLOR_c] )*  a  a+d  a+2d ...

Each image is a flat color c from a fixed palette plus noise; the token after it names c, so
predicting it needs the image. The text continues an arithmetic sequence (start a, step d drawn per
sample) over the text vocabulary, which a small model learns from the first two terms. Labels are
-100 on BOS and image positions.
"""

from __future__ import annotations

import torch

from megamm.config import LlavaConfig
from megamm.config.constants import IGNORE_INDEX

BOS_ID = 1
NUM_COLORS = 8
FIRST_COLOR_ID = 2
PALETTE = torch.tensor(
    [[-1, -1, -1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1], [1, 1, 1]],
    dtype=torch.float32,
)


class SyntheticMultimodalDataset:
    def __init__(self, config: LlavaConfig, seq_length: int, seed: int, max_images: int = 1) -> None:
        self.seq_length = seq_length
        self.seed = seed
        self.max_images = max_images
        self.image_token_id = config.language.image_token_id
        self.tokens_per_image = config.image_tokens_per_image
        vision = config.vision
        self.image_shape = (vision.num_channels, vision.image_size, vision.image_size)
        first_text = FIRST_COLOR_ID + NUM_COLORS
        self.text_ids = torch.tensor(
            [i for i in range(first_text, config.language.vocab_size) if i != self.image_token_id]
        )
        needed = 3 + max_images * (self.tokens_per_image + 1)
        if seq_length < needed:
            raise ValueError(
                f"synthetic data: sequence length {seq_length} cannot hold {max_images} image(s) of "
                f"{self.tokens_per_image} tokens plus text; need at least {needed}"
            )
        if len(self.text_ids) < 16 or self.image_token_id < first_text:
            raise ValueError(
                f"synthetic data needs at least 16 text ids from {first_text} up and the image token "
                f"id at or above {first_text}; got vocab {config.language.vocab_size}, image token "
                f"{self.image_token_id}"
            )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        num_images = int(torch.randint(0, self.max_images + 1, (), generator=generator))
        colors = torch.randint(0, NUM_COLORS, (num_images,), generator=generator)
        noise = 0.1 * torch.randn((num_images, *self.image_shape), generator=generator)
        pixel_values = PALETTE[colors][:, : self.image_shape[0], None, None] + noise
        tokens = [BOS_ID]
        for color in colors.tolist():
            tokens += [self.image_token_id] * self.tokens_per_image + [FIRST_COLOR_ID + color]
        start = int(torch.randint(0, len(self.text_ids), (), generator=generator))
        step = int(torch.randint(1, 4, (), generator=generator))
        remaining = self.seq_length - len(tokens)
        positions = (start + step * torch.arange(remaining)) % len(self.text_ids)
        input_ids = torch.cat([torch.tensor(tokens), self.text_ids[positions]])
        labels = input_ids.masked_fill(input_ids == self.image_token_id, IGNORE_INDEX)
        labels[0] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | None]:
    """Stack samples of equal length; images of all samples in batch order."""
    images = [s["pixel_values"] for s in samples]
    counts = torch.tensor([len(i) for i in images])
    return {
        "input_ids": torch.stack([s["input_ids"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "pixel_values": torch.cat(images) if int(counts.sum()) else None,
        "images_per_sample": counts,
    }


def microbatch_indices(
    first_position: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
) -> list[list[int]]:
    """Sample indices of this dp rank's microbatches for the global batch that starts at sample
    `first_position` (the samples consumed before it, `megamm.data.loader.ResumePoint`).

    A global batch consumes samples `[first, first + G)` whatever dp and accumulation are, and each
    dp rank takes a contiguous 1/dp of them, so a run can resume from its consumed samples alone and
    changing dp or accumulation does not change what one step trains on.
    """
    per_rank = global_batch // dp_size
    start = first_position + dp_rank * per_rank
    return [list(range(start + m, start + m + micro_batch)) for m in range(0, per_rank, micro_batch)]
