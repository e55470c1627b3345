"""Images and videos across context-parallel ranks: each cp rank encodes a share of a microbatch's
vision items, and their embeddings reach the ranks whose positions hold their tokens.

An item is one image or one video; its embedding rows are its tokens (fixed-size towers:
`image_tokens_per_image`; native-resolution towers: `t * h * w / merge^2`). The microbatch's
vision tokens are numbered in one ordinal space, images first and then videos, each kind in the
row-major order of its placeholder positions over the whole `[b, s]` batch (the order the items'
rows fill them), so item i owns a contiguous run of ordinals.

`VisionShares.balanced` gives each item to a cp rank: largest cost first, each to the rank with
the least work so far (ties to the lower rank). The cost of a fixed-size image is the same for
every image, which makes the assignment round robin (rank r encodes images r, r + cp, ...); a
native-resolution item costs its patches, since native images differ in size and the tower's
work grows with the patches (attention stays inside each frame, so splitting items between ranks
changes no result). The vision tower's activations and compute thus fall to about 1/cp per rank.

Each rank encodes its items in item order and `local_vision_embeddings` returns the rows of the
vision tokens among its own positions. Every rank reads the whole microbatch, so from the token ids
alone every rank knows which rank encoded each vision token (at which row) and which rank holds its
position: each rank sends every other exactly the rows that rank's positions hold (one
all_to_all over cp with computed splits, `megamm.parallel.context.exchange_rows`; backward sends
each row's gradient back to the rank that encoded it, so the tower's gradient flows there). A rank
thus receives its own k rows, not the microbatch's N (an all-gather of every share holds
`cp x the largest share` rows on every rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megamm.parallel.context import exchange_rows, local_positions
from megamm.parallel.state import ParallelState


@dataclass(frozen=True)
class VisionShares:
    """Which cp rank encodes each vision item of a microbatch.

    owners: per item (images, then videos, in batch order), the cp rank that encodes it;
    tokens: per item, its embedding rows.
    """

    owners: tuple[int, ...]
    tokens: tuple[int, ...]
    cp_size: int

    @classmethod
    def balanced(cls, costs: Sequence[int], tokens: Sequence[int], cp_size: int) -> VisionShares:
        """Largest cost first to the least-loaded rank (ties: the lower rank; a stable sort keeps
        equal costs in item order, so equal costs go round robin)."""
        if len(costs) != len(tokens):
            raise ValueError(f"{len(costs)} item costs for {len(tokens)} items")
        load = [0] * cp_size
        owners = [0] * len(costs)
        for item in sorted(range(len(costs)), key=lambda i: -costs[i]):
            rank = min(range(cp_size), key=lambda r: (load[r], r))
            owners[item] = rank
            load[rank] += costs[item]
        return cls(tuple(owners), tuple(int(t) for t in tokens), cp_size)

    def items_of(self, rank: int) -> list[int]:
        """The items cp rank `rank` encodes, in item order (the order of its encoded rows)."""
        return [i for i, owner in enumerate(self.owners) if owner == rank]

    def rows_of(self, rank: int) -> int:
        """The embedding rows cp rank `rank` encodes."""
        return sum(self.tokens[i] for i in self.items_of(rank))

    def source_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(owner, row) `[N]` int64 each, for every ordinal of the microbatch's N vision tokens: the
        cp rank that encodes it and its row among that rank's encoded rows."""
        owner, row, filled = [], [], [0] * self.cp_size
        for rank, count in zip(self.owners, self.tokens):
            owner.append(torch.full((count,), rank, dtype=torch.int64))
            row.append(torch.arange(filled[rank], filled[rank] + count))
            filled[rank] += count
        if not owner:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        return torch.cat(owner), torch.cat(row)


def vision_ordinals(kinds: Sequence[torch.Tensor], cp_size: int, cp_rank: int) -> torch.Tensor:
    """`[k]` int64: the ordinals of the vision tokens among cp rank `cp_rank`'s positions, in the
    row-major order of its `[b, s/cp]` positions (the order `masked_scatter` fills), one kind after
    the other.

    kinds: `[b, s]` bool over the whole sequence per kind (images, then videos), True at its
    placeholder tokens; a kind's ordinals follow all tokens of the kinds before it.
    """
    found, offset = [], 0
    for positions in kinds:
        held = local_positions(positions.shape[-1], cp_size, cp_rank, positions.device)
        ordinal = positions.flatten().cumsum(0).view_as(positions) - 1 + offset
        found.append(ordinal[:, held][positions[:, held]])
        offset += int(positions.sum())
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.int64)


def local_vision_embeddings(encoded: torch.Tensor, shares: VisionShares, kinds: Sequence[torch.Tensor],
                            state: ParallelState) -> torch.Tensor:
    """The embedding rows this rank writes into its vision-token positions.

    encoded: `[rows, h]` the rows of this rank's items (`shares.items_of(cp_rank)`, in item order);
    kinds: `[b, s]` bool placeholder positions per kind over the whole sequence (`vision_ordinals`).
    Returns `[k, h]` for this rank's k vision-token positions, kinds in order: at cp = 1 `encoded`
    itself (every row, in ordinal order).
    """
    cp, me = state.cp_size, state.cp_rank
    if cp == 1:
        return encoded
    kinds = [positions.cpu() for positions in kinds]
    owner, row = shares.source_rows()
    needed = [vision_ordinals(kinds, cp, rank) for rank in range(cp)]
    sent = [ordinals[owner[ordinals] == me] for ordinals in needed]  # what each rank needs from me
    send_counts = [len(ordinals) for ordinals in sent]
    source = owner[needed[me]]
    receive_counts = torch.bincount(source, minlength=cp).tolist()
    index = row[torch.cat(sent)].to(encoded.device)
    received = exchange_rows(encoded.index_select(0, index), send_counts, receive_counts, state.cp_group)
    # Received rows come by source rank, each source's in this rank's position order: a stable sort
    # of the sources is that order, its inverse puts the rows back in position order.
    order = torch.argsort(source, stable=True)
    return received.index_select(0, torch.argsort(order).to(encoded.device))
