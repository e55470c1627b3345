"""Images across context-parallel ranks: each cp rank encodes a share of a microbatch's images, and
the image embeddings reach the ranks whose positions hold their tokens.

cp rank r encodes images r, r + cp, r + 2cp, ... of the microbatch (batch order, the order the
image-token positions consume them), so the vision tower's activations and compute fall to about
1/cp per rank. The encoded shares are padded to ceil(n / cp) images and all-gathered over cp
(`megamm.parallel.context.gather_shares`; backward: each rank receives the summed gradient of its
own images, so the vision tower's gradient flows back to the rank that encoded the image); each
rank then keeps the embeddings of the image tokens among its own positions.

The gathered tensor is `[n, tokens_per_image, h]` on every rank, as large as the full sequence's
image tokens; a targeted exchange (each image only to the ranks holding its tokens) would cut that
transient, at the price of a rank-pair schedule. The vision tower's own activations, which are
several times larger per image (its sequence times its width times its layers), are what falls.
"""

from __future__ import annotations

import torch

from megamm.parallel.context import gather_shares, split_sequence
from megamm.parallel.state import ParallelState


def image_share(pixel_values: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """`[n, C, H, W]` -> the images this cp rank encodes: r, r + cp, ... (all of them at cp=1)."""
    if state.cp_size == 1:
        return pixel_values
    return pixel_values[state.cp_rank :: state.cp_size]


def local_image_embeddings(encoded: torch.Tensor, images: int, image_positions: torch.Tensor,
                           state: ParallelState) -> torch.Tensor:
    """The embeddings this rank writes into its image-token positions.

    encoded: `[m, t, h]` this rank's share (`image_share`, encoded); images: n, the microbatch's
    image count; image_positions: `[b, s]` bool over the whole sequence. Returns the embeddings in
    the row-major order of this rank's image-token positions among its `[b, s/cp]` positions (the
    order `masked_scatter` fills): `encoded` itself, `[n, t, h]`, at cp = 1; `[k, h]` for its k
    image-token positions at cp > 1.
    """
    cp = state.cp_size
    if cp == 1:
        return encoded
    per_rank = -(-images // cp)
    tokens, hidden = encoded.shape[1:]
    padding = encoded.new_zeros(per_rank - encoded.shape[0], tokens, hidden)
    gathered = gather_shares(torch.cat([encoded, padding]), state.cp_group)  # [cp, per_rank, t, h]
    # Image i is rank i % cp's slot i // cp: slot-major order puts the images back in batch order.
    every = gathered.transpose(0, 1).reshape(per_rank * cp * tokens, hidden)[: images * tokens]
    # The ordinal of each image-token position among the batch's image tokens (row-major), which
    # is the row of `every` that fills it.
    ordinal = image_positions.flatten().cumsum(0).view_as(image_positions) - 1
    mine = split_sequence(ordinal, state)[split_sequence(image_positions, state)]
    return every.index_select(0, mine)
