"""Autograd-aware collectives for the tensor-parallel and sequence-parallel regions.

Each function is a pair of collectives, one for forward and its adjoint for backward:

| function                                   | forward                 | backward                 |
|--------------------------------------------|-------------------------|--------------------------|
| copy_to_tensor_parallel_region             | identity                | all-reduce               |
| reduce_from_tensor_parallel_region         | all-reduce              | identity                 |
| scatter_to_tensor_parallel_region          | split last dim          | all-gather last dim      |
| gather_from_tensor_parallel_region         | all-gather last dim     | split last dim           |
| scatter_to_sequence_parallel_region        | split dim 0             | all-gather dim 0         |
| gather_from_sequence_parallel_region       | all-gather dim 0        | reduce-scatter or split  |
| reduce_scatter_to_sequence_parallel_region | reduce-scatter dim 0    | all-gather dim 0         |

Activations are `[s, b, h]`, so "dim 0" is the sequence. A `None` group or a group of one rank
makes every function the identity, which is what lets the same module run in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _uses_nccl(group: Group) -> bool:
    return dist.get_backend(group) == "nccl"


def all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum of `x` over the group, as a new tensor (the input is left untouched)."""
    if group_size(group) == 1:
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def all_gather_dim0(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0, in rank order."""
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    if _uses_nccl(group):
        out = x.new_empty((x.shape[0] * size, *x.shape[1:]))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, x, group=group)
        return out
    # gloo: the list form works on every torch release we support.
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=0)


def reduce_scatter_dim0(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum over the group, then keep this rank's 1/size slice of dim 0."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[0] % size != 0:
        raise ValueError(f"dim 0 of size {x.shape[0]} does not split over {size} ranks")
    x = x.contiguous()
    if _uses_nccl(group):
        out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        scatter(out, x, group=group)
        return out
    # gloo: reduce-scatter is not available on every release; all-reduce then slice is exact.
    return split_dim(all_reduce(x, group), 0, group)


def split_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's equal slice of `x` along `dim` (a copy, so it owns its storage)."""
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size != 0:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split over {size} ranks")
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


def gather_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate every rank's `x` along the last dim, in rank order."""
    if group_size(group) == 1:
        return x
    gathered = all_gather_dim0(x.movedim(-1, 0), group)
    return gathered.movedim(0, -1).contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ScatterLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return split_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return gather_last_dim(grad, ctx.group), None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return split_dim(grad, -1, ctx.group), None


class _ScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return split_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather_dim0(grad, ctx.group), None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, grad_is_partial: bool) -> torch.Tensor:
        ctx.group = group
        ctx.grad_is_partial = grad_is_partial
        return all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.grad_is_partial:
            return reduce_scatter_dim0(grad, ctx.group), None, None
        return split_dim(grad, 0, ctx.group), None, None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather_dim0(grad, ctx.group), None


def copy_to_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a tp region with a replicated input: each rank's grad is partial, so sum it."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Leave a tp region by summing partial outputs (row-parallel linear, vocab embedding)."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Keep this rank's slice of the last dim of a replicated tensor."""
    return x if group_size(group) == 1 else _ScatterLastDim.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Concatenate the last-dim slices of all ranks into the replicated full tensor."""
    return x if group_size(group) == 1 else _GatherLastDim.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """`[s, b, h]` replicated -> `[s/tp, b, h]` (this rank's sequence chunk)."""
    return x if group_size(group) == 1 else _ScatterSequence.apply(x, group)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group: Group, grad_is_partial: bool = True
) -> torch.Tensor:
    """`[s/tp, b, h]` -> `[s, b, h]` on every rank.

    `grad_is_partial` says what the consumer's gradient looks like: True when the gathered tensor
    feeds a tensor-parallel op (each rank's grad is a partial sum, so backward reduce-scatters);
    False when it feeds replicated computation (grads are already complete, so backward splits).
    """
    if group_size(group) == 1:
        return x
    return _GatherSequence.apply(x, group, grad_is_partial)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Partial `[s, b, h]` -> summed `[s/tp, b, h]` chunk (row-parallel output under SP)."""
    return x if group_size(group) == 1 else _ReduceScatterSequence.apply(x, group)
