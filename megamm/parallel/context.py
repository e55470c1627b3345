"""Context parallelism: which tokens a cp rank holds, and the collectives that move sequence pieces.

The sequence of length s is cut into 2 x cp equal chunks; cp rank r holds chunks r and
2cp - 1 - r, in that order (`local_positions`). Under causal attention chunk i attends to chunks
0..i, so a rank holding an early and a late chunk does the same attention work as every other
rank (the causal load balance of Megatron-LM's context parallelism). Every per-token tensor of a
microbatch (token ids, labels after the shift, position ids of any shape `[..., b, s]`, the rows of
an attention mask) is cut with the same positions (`split_sequence`), so M-RoPE's `[3, b, s]`
positions split like the 1-D ones.

`RingExchange` passes a tensor to the next rank of the ring and receives the previous rank's
(the K/V blocks of ring attention, megamm.transformer.ring_attention); `exchange_rows` sends each
cp rank the rows meant for it (the image embeddings its positions hold, megamm.models.image_shares).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamm.parallel.mappings import Group, group_size
from megamm.parallel.phase import waiting_on_peers
from megamm.parallel.state import ParallelState


def chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two chunks (of 2 x cp) that cp rank `cp_rank` holds, early one first."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def local_positions(seq_length: int, cp_size: int, cp_rank: int, device: torch.device | None = None) -> torch.Tensor:
    """`[s / cp]` int64: the global sequence positions this rank holds, in its local order."""
    if seq_length % (2 * cp_size):
        raise ValueError(f"sequence length {seq_length} is not divisible by 2 x context-parallel size {cp_size}")
    chunk = seq_length // (2 * cp_size)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in chunk_ids(cp_size, cp_rank)])


def split_sequence(tensor: torch.Tensor, state: ParallelState, dim: int = -1) -> torch.Tensor:
    """This cp rank's share of a full-sequence tensor along `dim` (the sequence dim); unchanged at cp=1.

    Autograd-safe (index_select): the gradient of a share lands on its global positions.
    """
    if state.cp_size == 1:
        return tensor
    positions = local_positions(tensor.shape[dim], state.cp_size, state.cp_rank, tensor.device)
    return tensor.index_select(dim, positions)


class RingExchange:
    """Send to the next cp rank and receive from the previous one, asynchronously.

    `start(tensor)` posts the pair (batch_isend_irecv, which gloo and NCCL both take) and returns at
    once, so the caller computes on the block it holds while the next one travels; `wait()` returns
    the received tensor. Forward and backward messages use their own tags.
    """

    def __init__(self, state: ParallelState, tag: int) -> None:
        ranks, rank = state.cp_ranks, state.cp_rank
        self.group = state.cp_group
        self.next_rank = ranks[(rank + 1) % len(ranks)]
        self.prev_rank = ranks[(rank - 1) % len(ranks)]
        self.tag = tag
        self._requests: list[dist.Work] = []
        self._received: torch.Tensor | None = None
        self._sent: torch.Tensor | None = None

    def start(self, tensor: torch.Tensor) -> None:
        self._sent = tensor.contiguous()
        self._received = torch.empty_like(self._sent)
        ops = [dist.P2POp(dist.isend, self._sent, self.next_rank, self.group, self.tag),
               dist.P2POp(dist.irecv, self._received, self.prev_rank, self.group, self.tag)]
        self._requests = dist.batch_isend_irecv(ops)

    def wait(self) -> torch.Tensor:
        with waiting_on_peers(f"context-parallel ring receive from global rank {self.prev_rank}"):
            for request in self._requests:
                request.wait()
        received, self._received, self._sent, self._requests = self._received, None, None, []
        assert received is not None, "RingExchange.wait without start"
        return received


class _ExchangeRows(torch.autograd.Function):
    """all_to_all_single of rows over cp with uneven splits; backward: the same exchange reversed
    (each row's gradient returns to the rank that sent it)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send_counts: list[int], receive_counts: list[int],
                group: Group) -> torch.Tensor:
        ctx.counts, ctx.group = (send_counts, receive_counts), group
        received = rows.new_empty(sum(receive_counts), *rows.shape[1:])
        dist.all_to_all_single(received, rows.contiguous(), receive_counts, send_counts, group=group)
        return received

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send_counts, receive_counts = ctx.counts
        out = grad.new_empty(sum(send_counts), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), send_counts, receive_counts, group=ctx.group)
        return out, None, None, None


def exchange_rows(rows: torch.Tensor, send_counts: list[int], receive_counts: list[int],
                  group: Group) -> torch.Tensor:
    """`[sum(send_counts), ...]` rows, the first send_counts[0] for cp rank 0, the next for rank 1, ...
    -> `[sum(receive_counts), ...]` the rows every rank sent this one, in cp-rank order (autograd).

    Every rank must pass counts that agree (rank a's send_counts[b] = rank b's receive_counts[a]).
    """
    if group_size(group) == 1:
        return rows
    return _ExchangeRows.apply(rows, send_counts, receive_counts, group)
