"""Vocab-parallel logits -> the full vocabulary, identical on every tensor-parallel rank.

The output layer leaves logits split over the vocabulary, `[.., V_pad/tp]` per rank, so that the
training loss never materializes the whole vocabulary. Choosing a token needs all of it: the shards
are all-gathered in rank order and the padding columns (the table is padded to a multiple of
`make_vocab_size_divisible_by * tp`, see `megamm.parallel.layers.pad_vocab_size`) are cut off; they
are not tokens, and after a model-only load their rows hold whatever the buffer held.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamm.parallel.mappings import gather_last_dim, group_size
from megamm.parallel.state import ParallelState


def full_vocab_logits(logits: torch.Tensor, state: ParallelState, vocab_size: int) -> torch.Tensor:
    """`[.., V_pad/tp]` local logits -> `[.., vocab_size]` fp32 logits, the same on every tp rank."""
    full = gather_last_dim(logits, state.tp_group)
    if full.shape[-1] < vocab_size:
        raise ValueError(f"the gathered logits have {full.shape[-1]} columns, fewer than the vocabulary {vocab_size}")
    return full[..., :vocab_size].float()


def agree_on_tokens(tokens: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Tensor-parallel rank 0's tokens on every tp rank.

    Every rank computes the same tokens from the same gathered logits and generator states, but the
    ranks must never diverge (a different token on one rank would give its shards other inputs from
    then on), so rank 0's choice is broadcast: one tiny collective per step buys the guarantee even
    where a kernel is not bitwise deterministic.
    """
    group = state.tp_group
    if group_size(group) == 1:
        return tokens
    tokens = tokens.contiguous()
    dist.broadcast(tokens, src=dist.get_global_rank(group, 0), group=group)
    return tokens
