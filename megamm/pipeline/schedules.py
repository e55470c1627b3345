"""Forward-backward schedules over the microbatches of one global batch.

Every schedule has the same signature, so the training step does not care which one runs:

    schedule(chunks, microbatches, total_tokens, buffers, loss_scale=1.0, forward_only=False) -> loss sum

- `forward_backward_no_pipelining`: gradient accumulation on one stage.
- `PipelineSchedule`: 1F1B (warm-up forwards, steady one-forward-one-backward, cool-down
  backwards) and, with several model chunks per stage, interleaved 1F1B over virtual stages;
  `forward_only=True` is the evaluation schedule.

Each rank executes its own ordered list of (F|B, chunk, microbatch) operations from
`schedule_order` (Megatron's order), receiving inputs/gradients from its neighbours when an
operation needs them. The order is consistent across ranks, which is what makes it deadlock-free.

Loss: the last stage backpropagates `sum(per-token loss) * loss_scale / total_tokens` per
microbatch (see megamm.training.step); the returned sum of per-token losses is only meaningful
on the last stage.

Gradient sync: a chunk's backward of every microbatch but the last runs inside its gradient
buffer's `no_sync()`, so only the last one starts the chunk's (overlapped) dp sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import TYPE_CHECKING

import torch

from megamm.parallel.phase import enter_phase
from megamm.parallel.state import ParallelState
from megamm.pipeline.p2p import PipelineChannel

if TYPE_CHECKING:
    from megamm.models.llava import LlavaModel
    from megamm.optim.grad_buffer import GradBuffer

Batch = dict[str, torch.Tensor | None]
Operation = tuple[str, int, int]  # ("F" or "B", model chunk, microbatch)
_PASS = {"F": "forward", "B": "backward"}


def bubble_fraction(pp: int, vp: int, num_microbatches: int) -> float:
    """Idle time of the schedule relative to the ideal compute time: (pp - 1) / (vp * M)."""
    return (pp - 1) / (vp * num_microbatches)


def _chunk_and_microbatch(k: int, pp: int, vp: int, forward: bool) -> tuple[int, int]:
    group = pp * vp
    chunk = (k % group) // pp
    if not forward:
        chunk = vp - 1 - chunk
    return chunk, (k // group) * pp + k % pp


def schedule_order(pp: int, pp_rank: int, vp: int, num_microbatches: int, forward_only: bool) -> list[Operation]:
    """This rank's operations in execution order."""
    total = num_microbatches * vp
    if forward_only:
        return [("F", *_chunk_and_microbatch(k, pp, vp, True)) for k in range(total)]
    if vp == 1:
        warmup = min(pp - pp_rank - 1, num_microbatches)
    elif num_microbatches == pp:
        warmup = total
    else:
        warmup = min((pp - pp_rank - 1) * 2 + (vp - 1) * pp, total)
    order = [("F", *_chunk_and_microbatch(k, pp, vp, True)) for k in range(warmup)]
    for i in range(total - warmup):
        order.append(("F", *_chunk_and_microbatch(warmup + i, pp, vp, True)))
        order.append(("B", *_chunk_and_microbatch(i, pp, vp, False)))
    order += [("B", *_chunk_and_microbatch(k, pp, vp, False)) for k in range(total - warmup, total)]
    return order


def _accumulating(buffers: Sequence[GradBuffer], last_microbatch: bool) -> AbstractContextManager:
    """Every buffer's `no_sync()`, except for the last microbatch, whose backward syncs."""
    stack = ExitStack()
    if not last_microbatch:
        for buffer in buffers:
            stack.enter_context(buffer.no_sync())
    return stack


def forward_backward_no_pipelining(
    chunks: list[LlavaModel],
    microbatches: list[Batch],
    total_tokens: float,
    buffers: list[GradBuffer] | None,
    loss_scale: float = 1.0,
    forward_only: bool = False,
) -> torch.Tensor:
    """Gradient accumulation: forward and backward each microbatch in turn on one stage.

    Returns the sum of per-token losses over the microbatches (fp32, detached). Every microbatch
    but the last runs inside the buffers' `no_sync()`, so the dp gradient sync starts in the last.
    """
    (model,) = chunks
    total = torch.zeros((), dtype=torch.float32, device=model.state.device)
    for index, microbatch in enumerate(microbatches):
        enter_phase(f"{'forward' if forward_only else 'forward/backward'} of microbatch {index}")
        with _accumulating(buffers or [], index == len(microbatches) - 1):
            with torch.no_grad() if forward_only else nullcontext():
                output = model(**microbatch)
                loss_sum = output["loss"].sum()
            if not forward_only:
                (loss_sum * (loss_scale / total_tokens)).backward()
        total += loss_sum.detach()
    return total


class PipelineSchedule:
    """1F1B / interleaved 1F1B over this stage's model chunks (see the module docstring)."""

    def __init__(self, state: ParallelState, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.state = state
        self.channel = PipelineChannel(state, shape, dtype)

    def __call__(
        self,
        chunks: list[LlavaModel],
        microbatches: list[Batch],
        total_tokens: float,
        buffers: list[GradBuffer] | None,
        loss_scale: float = 1.0,
        forward_only: bool = False,
    ) -> torch.Tensor:
        state = self.state
        order = schedule_order(state.pp_size, state.pp_rank, len(chunks), len(microbatches), forward_only)
        inputs: dict[tuple[int, int], torch.Tensor | None] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        total = torch.zeros((), dtype=torch.float32, device=state.device)
        try:
            for kind, chunk, microbatch in order:
                enter_phase(f"{_PASS[kind]} of microbatch {microbatch}, chunk {chunk}, pipeline stage {state.pp_rank}")
                if kind == "F":
                    total += self._forward(chunks[chunk], microbatches[microbatch], chunk, microbatch,
                                           total_tokens, loss_scale, forward_only, inputs, outputs)
                else:
                    # buffers[chunk] is this chunk's own; a tied-embedding buffer after the chunks'
                    # is not overlapped and syncs in finish_grad_sync.
                    own = [buffers[chunk]] if buffers is not None else []
                    with _accumulating(own, microbatch == len(microbatches) - 1):
                        self._backward(chunks[chunk], inputs.pop((chunk, microbatch)),
                                       outputs.pop((chunk, microbatch)))
        finally:
            self.channel.wait_sends()
        return total

    def _forward(self, model: LlavaModel, batch: Batch, chunk: int, microbatch: int, total_tokens: float,
                 loss_scale: float, forward_only: bool, inputs: dict, outputs: dict) -> torch.Tensor:
        received = None
        if not model.pre_process:
            received = self.channel.recv_activation()
            received.requires_grad_(not forward_only)
        with torch.no_grad() if forward_only else nullcontext():
            output = model(**batch, decoder_input=received)
        if model.post_process:
            loss_sum = output["loss"].sum()
            result = loss_sum * (loss_scale / total_tokens)
            contribution = loss_sum.detach()
        else:
            result = output["hidden_states"]
            self.channel.send_activation(result)
            contribution = torch.zeros((), device=self.state.device)
        if not forward_only:
            inputs[(chunk, microbatch)] = received
            outputs[(chunk, microbatch)] = result
        return contribution

    def _backward(self, model: LlavaModel, received: torch.Tensor | None, result: torch.Tensor) -> None:
        if model.post_process:
            torch.autograd.backward(result)
        else:
            torch.autograd.backward(result, self.channel.recv_gradient())
        if received is not None:
            self.channel.send_gradient(received.grad)
