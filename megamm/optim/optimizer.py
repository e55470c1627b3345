"""AdamW with fp32 master weights, plain or sharded across data parallelism.

Both optimizers work on "pieces": fp32 master tensors with a gradient view into the main-grad
buffer and a link back to where the updated values go in the model.

- `MixedPrecisionOptimizer`: one piece per trainable parameter. fp32 parameters are their own
  master; bf16/fp16 parameters get an fp32 copy. Every dp rank holds all optimizer state.
- `DistributedOptimizer` (ZeRO-1 style): each dp rank (each dp x cp rank under context
  parallelism: the buffers' group) owns one equal shard of every gradient bucket, so its pieces are the intersections of parameters with its shards. Master weights and
  Adam moments exist only for those, i.e. about 1/dp of the state per rank. After the step each rank
  writes its updated shard into the flat parameter buffer and the buffer is all-gathered.

The step itself: unscale (fp16), global grad norm, skip if not finite, clip, AdamW, copy back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megamm.optim.grad_buffer import GradBuffer
from megamm.parallel.mappings import group_size
from megamm.parallel.params import ParamSpec, TiedEmbedding
from megamm.parallel.state import ParallelState


@dataclass
class ParamGroupSpec:
    """Optimizer settings of one parameter: weight decay and learning-rate multiplier."""

    weight_decay: float
    lr_scale: float


@dataclass
class Piece:
    """An fp32 master tensor, its grad (a main-grad view) and where its values go back to."""

    master: torch.Tensor
    grad: torch.Tensor
    param: nn.Parameter
    # Flat [start, end) within the parameter, or None for the whole parameter.
    span: tuple[int, int] | None
    spec: ParamGroupSpec
    # Counted in the grad norm on this rank (parameters replicated across tp count on tp rank 0).
    counts_in_norm: bool


def counts_in_norm(spec: ParamSpec, state: ParallelState, sharded_over_dp: bool) -> bool:
    """Whether this rank's copy of the parameter with record `spec` adds to the global grad norm, so
    each element counts once.

    Tensor-parallel shards are distinct on every tp rank; replicated parameters count on tp rank 0.
    The last stage's copy of a tied embedding table counts only when the distributed optimizer
    splits the pair's gradient into disjoint shards; otherwise the first stage's copy counts.
    """
    if spec.tied is TiedEmbedding.OUTPUT_COPY and not sharded_over_dp:
        return False
    return not spec.tp_replicated or state.tp_rank == 0


class _AdamWOverPieces:
    """The shared step: norm, skip, clip, AdamW, copy back."""

    def __init__(self, pieces: list[Piece], state: ParallelState, lr: float, betas, eps: float,
                 norm_group: dist.ProcessGroup | None) -> None:
        """norm_group: the ranks whose squared norms add up to the global one, a group of `state`
        (None: this process alone)."""
        self.pieces = pieces
        self.state = state
        self.norm_group = norm_group
        groups: dict[tuple[float, float], list[torch.Tensor]] = {}
        for piece in pieces:
            groups.setdefault((piece.spec.weight_decay, piece.spec.lr_scale), []).append(piece.master)
        self.lr_scales = []
        param_groups = []
        for (weight_decay, lr_scale), masters in groups.items():
            param_groups.append({"params": masters, "weight_decay": weight_decay, "lr": lr * lr_scale})
            self.lr_scales.append(lr_scale)
        # A rank may own no piece at all (a small model split over many dp ranks).
        holder = [torch.zeros(1, requires_grad=True)] if not param_groups else None
        # fused: one kernel per parameter group instead of about ten element-wise passes per tensor
        # (on 2 CPU cores the step of a 50M-parameter model is ~5x faster, bench/bench_train_step.py);
        # the masters are fp32 tensors on one CPU or CUDA device, which the fused kernel requires.
        self.adam = torch.optim.AdamW(param_groups or [{"params": holder}], lr=lr, betas=betas, eps=eps,
                                      fused=True)

    def set_lr(self, lr: float) -> None:
        for group, scale in zip(self.adam.param_groups, self.lr_scales):
            group["lr"] = lr * scale

    def grad_norm(self) -> float:
        """Global L2 norm over all trainable parameters, each counted once."""
        norms = [torch.linalg.vector_norm(piece.grad, dtype=torch.float32) for piece in self.pieces
                 if piece.counts_in_norm]
        squares = torch.stack(norms).pow(2).sum() if norms else torch.zeros((), device=self.state.device)
        if group_size(self.norm_group) > 1:
            dist.all_reduce(squares, group=self.norm_group)
        return math.sqrt(squares.item()) if math.isfinite(squares.item()) else float("nan")

    def step(self, clip_grad: float, grad_scale: float = 1.0) -> tuple[bool, float]:
        """One update. Returns (applied, grad_norm); a non-finite norm skips the update."""
        grads = [piece.grad for piece in self.pieces]
        if grad_scale != 1.0 and grads:
            torch._foreach_mul_(grads, 1.0 / grad_scale)
        norm = self.grad_norm()
        if not math.isfinite(norm):
            return False, norm
        if clip_grad > 0 and norm > clip_grad and grads:
            torch._foreach_mul_(grads, clip_grad / (norm + 1e-6))
        # The grads are attached for the update only (a separate master's .grad would otherwise
        # keep the buffer view referenced; an fp32 parameter's .grad is the buffer view anyway and
        # is set again by GradBuffer.start_step).
        for piece in self.pieces:
            piece.master.grad = piece.grad
        self.adam.step()
        for piece in self.pieces:
            piece.master.grad = None
        self._copy_back()
        return True, norm

    def _copy_back(self) -> None:
        """Write the updated masters into the model parameters."""
        raise NotImplementedError

    @torch.no_grad()
    def reset_masters_from_params(self) -> None:
        """Refresh the fp32 masters from the parameters (after loading weights without optimizer state)."""
        for piece in self.pieces:
            if piece.master is piece.param:
                continue
            source = piece.param.detach().reshape(-1)
            if piece.span is not None:
                source = source[piece.span[0] : piece.span[1]]
            piece.master.copy_(source.view_as(piece.master))

    def state_bytes(self) -> int:
        """Bytes of fp32 master copies and Adam moments held by this rank."""
        total = 0
        for piece in self.pieces:
            if piece.master is not piece.param:
                total += piece.master.numel() * piece.master.element_size()
            for value in self.adam.state.get(piece.master, {}).values():
                if torch.is_tensor(value) and value.dim() > 0:
                    total += value.numel() * value.element_size()
        return total

    def state_dict(self) -> dict:
        return self.adam.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.adam.load_state_dict(state)


class MixedPrecisionOptimizer(_AdamWOverPieces):
    def __init__(self, buffers: list[GradBuffer], groups: Mapping[nn.Parameter, ParamGroupSpec],
                 params: Mapping[nn.Parameter, ParamSpec], state: ParallelState,
                 lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        """groups: each trainable parameter's optimizer settings; params: the parameter records."""
        pieces = []
        for buffer in buffers:
            for param in buffer.params:
                master = param if param.dtype == torch.float32 else param.detach().float().clone()
                pieces.append(Piece(master, buffer.main_grad(param), param, None, groups[param],
                                    counts_in_norm(params[param], state, sharded_over_dp=False)))
        # Grads are identical across dp, so the norm sums over the model-parallel ranks only.
        super().__init__(pieces, state, lr, betas, eps, norm_group=state.mp_group)

    def _copy_back(self) -> None:
        with torch.no_grad():
            for piece in self.pieces:
                if piece.master is not piece.param:
                    piece.param.copy_(piece.master)


class DistributedOptimizer(_AdamWOverPieces):
    def __init__(self, buffers: list[GradBuffer], groups: Mapping[nn.Parameter, ParamGroupSpec],
                 params: Mapping[nn.Parameter, ParamSpec], state: ParallelState,
                 lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        """groups: each trainable parameter's optimizer settings; params: the parameter records."""
        if not all(buffer.shard_for_optimizer for buffer in buffers):
            raise ValueError("the distributed optimizer needs GradBuffers built with shard_for_optimizer=True")
        self.buffers = buffers
        pieces = []
        for buffer in buffers:
            for bucket in buffer.buckets:
                shard_start, shard_end = buffer.shard_range(bucket)
                for param in bucket.params:
                    start, end = buffer.offsets[param]
                    lo, hi = max(start, shard_start), min(end, shard_end)
                    if lo >= hi:
                        continue
                    master = param.detach().reshape(-1)[lo - start : hi - start].float().clone()
                    grad = buffer.grad_data[lo:hi]
                    pieces.append(Piece(master, grad, param, (lo - start, hi - start), groups[param],
                                        counts_in_norm(params[param], state, sharded_over_dp=True)))
        # Each dp rank holds a disjoint shard: the norm sums over every rank.
        super().__init__(pieces, state, lr, betas, eps, norm_group=state.world_group)

    def _copy_back(self) -> None:
        with torch.no_grad():
            for piece in self.pieces:
                start, end = piece.span
                piece.param.data.view(-1)[start:end].copy_(piece.master)
        for buffer in self.buffers:
            buffer.all_gather_params()
