"""Point-to-point exchange of fixed-shape activations and their gradients between stages.

Stages form a ring over the pipeline group (the last stage's "next" is the first stage: with
virtual stages a microbatch goes around several times). Shapes never come from a microbatch:
they are `[s/tp or s, micro_batch, hidden]` from the config, so no shape handshake is needed.

Sends are asynchronous and completed at the end of the schedule; receives block. Activations and
gradients travel on two separate process groups, so each group carries one kind of message per
direction in the same order on both ends (NCCL matches point-to-point messages by order, and
separate communicators keep a pending send of one kind from stalling a receive of the other).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamm.parallel.phase import waiting_on_peers
from megamm.parallel.state import ParallelState

ACTIVATION_TAG = 1
GRADIENT_TAG = 2
_KINDS = {ACTIVATION_TAG: "activation", GRADIENT_TAG: "gradient"}


class PipelineChannel:
    """Sends and receives of one rank to/from its pipeline neighbours."""

    def __init__(self, state: ParallelState, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.state = state
        self.shape = shape
        self.dtype = dtype
        ranks, rank = state.pp_ranks, state.pp_rank
        self.next_rank = ranks[(rank + 1) % len(ranks)]
        self.prev_rank = ranks[(rank - 1) % len(ranks)]
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []

    def _recv(self, src: int, tag: int, group: dist.ProcessGroup) -> torch.Tensor:
        tensor = torch.empty(self.shape, dtype=self.dtype, device=self.state.device)
        with waiting_on_peers(f"pipeline p2p receive from global rank {src} ({_KINDS[tag]})"):
            dist.recv(tensor, src=src, group=group, tag=tag)
        return tensor

    def _send(self, tensor: torch.Tensor, dst: int, tag: int, group: dist.ProcessGroup) -> None:
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise RuntimeError(
                f"pipeline stage {self.state.pp_rank} tried to send {tuple(tensor.shape)} {tensor.dtype}; every "
                f"stage exchanges {self.shape} {self.dtype} (sequence length, micro batch and hidden size "
                "must match the config)"
            )
        payload = tensor.detach().contiguous()
        # Keep the tensor alive until the send completes.
        self._pending.append((dist.isend(payload, dst=dst, group=group, tag=tag), payload))

    def recv_activation(self) -> torch.Tensor:
        return self._recv(self.prev_rank, ACTIVATION_TAG, self.state.pp_group)

    def send_activation(self, tensor: torch.Tensor) -> None:
        self._send(tensor, self.next_rank, ACTIVATION_TAG, self.state.pp_group)

    def recv_gradient(self) -> torch.Tensor:
        return self._recv(self.next_rank, GRADIENT_TAG, self.state.pp_grad_group)

    def send_gradient(self, tensor: torch.Tensor) -> None:
        self._send(tensor, self.prev_rank, GRADIENT_TAG, self.state.pp_grad_group)

    def wait_sends(self) -> None:
        with waiting_on_peers("pipeline p2p sends completing"):
            for work, _ in self._pending:
                work.wait()
        self._pending.clear()
