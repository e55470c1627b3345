"""How each parameter relates to its full ("master") tensor, and layout-independent init.

Every parameter megamm creates carries a `ParamLayout` (attribute `param.param_layout`). It says how to
build the master tensor (shape and init function) and how the local tensor is cut from it:

- `partition_dim=None`: replicated across tp; the local tensor is the master.
- `partition_dim=d`: the master is split in `tp` equal chunks along `d` and rank r keeps chunk r.
- `fused_parts`: the master is a concatenation of parts along `d` (q, k, v of a fused QKV
  projection; gate and up of a SwiGLU fc1). Each part is split separately and rank r keeps
  `[part0_r, part1_r, ...]`, so the master keeps the natural, tp-independent layout
  `[q; k; v]` / `[gate; up]` while each rank computes with whole heads and whole channels.
- `padded_size`: rows appended as zeros along `d` before splitting (vocabulary padding). The
  padding depends on tp, the real rows do not, so tp=1 and tp=4 still start from the same model.

`initialize_parameters` fills every parameter from a generator seeded by (seed, global parameter
name). That is what makes a tp=4 model identical to a tp=1 model, and what the parity tests lean on.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from megamm.parallel.mappings import Group, all_gather_dim0, group_rank, group_size

InitFn = Callable[[torch.Tensor, torch.Generator], None]


def normal_init(std: float) -> InitFn:
    def init(tensor: torch.Tensor, generator: torch.Generator) -> None:
        tensor.normal_(0.0, std, generator=generator)

    return init


def constant_init(value: float) -> InitFn:
    def init(tensor: torch.Tensor, generator: torch.Generator) -> None:
        tensor.fill_(value)

    return init


def scaled_init(std: float, num_layers: int) -> InitFn:
    """Megatron's init for the output projections of residual branches: std / sqrt(2 L)."""
    return normal_init(std / math.sqrt(2.0 * num_layers))


@dataclass(frozen=True)
class ParamLayout:
    """The master shape, init and tensor-parallel placement of one parameter."""

    master_shape: tuple[int, ...]
    init: InitFn
    partition_dim: int | None = None
    fused_parts: tuple[int, ...] | None = None
    padded_size: int | None = None
    # Under sequence parallelism the grads of some replicated parameters (norms, row-parallel
    # biases) are partial sums over the sequence chunks and must be all-reduced across tp.
    sequence_parallel: bool = False

    def local_shape(self, tp_size: int) -> tuple[int, ...]:
        shape = list(self.master_shape)
        if self.partition_dim is not None:
            full = self.padded_size or shape[self.partition_dim]
            if full % tp_size != 0:
                raise ValueError(f"size {full} along dim {self.partition_dim} not divisible by tp={tp_size}")
            shape[self.partition_dim] = full // tp_size
        return tuple(shape)


def new_parameter(
    layout: ParamLayout, tp_size: int, dtype: torch.dtype, device: torch.device | str
) -> nn.Parameter:
    """An uninitialized local parameter tagged with its layout (filled by initialize_parameters)."""
    param = nn.Parameter(torch.empty(layout.local_shape(tp_size), dtype=dtype, device=device))
    param.param_layout = layout
    return param


def shard_master(master: torch.Tensor, layout: ParamLayout, rank: int, size: int) -> torch.Tensor:
    """Cut this rank's local tensor out of the master tensor."""
    dim = layout.partition_dim
    if dim is None:
        return master
    if layout.padded_size is not None:
        pad_rows = layout.padded_size - master.shape[dim]
        pad_shape = list(master.shape)
        pad_shape[dim] = pad_rows
        master = torch.cat([master, master.new_zeros(pad_shape)], dim=dim)
    parts = master.split(list(layout.fused_parts), dim=dim) if layout.fused_parts else [master]
    return torch.cat([part.chunk(size, dim=dim)[rank] for part in parts], dim=dim)


def unshard_local(locals_in_rank_order: list[torch.Tensor], layout: ParamLayout) -> torch.Tensor:
    """Inverse of `shard_master`: the master tensor from every rank's local tensor."""
    dim = layout.partition_dim
    if dim is None:
        return locals_in_rank_order[0]
    size = len(locals_in_rank_order)
    if layout.fused_parts:
        local_parts = [part // size for part in layout.fused_parts]
        per_rank = [local.split(local_parts, dim=dim) for local in locals_in_rank_order]
        master = torch.cat(
            [torch.cat([parts[i] for parts in per_rank], dim=dim) for i in range(len(local_parts))],
            dim=dim,
        )
    else:
        master = torch.cat(locals_in_rank_order, dim=dim)
    return master.narrow(dim, 0, layout.master_shape[dim])


def gather_master(local: torch.Tensor, layout: ParamLayout, tp_group: Group) -> torch.Tensor:
    """All-gather a parameter (or its gradient) across tp into the master layout, on every rank."""
    if layout.partition_dim is None:
        return local
    if group_size(tp_group) == 1:
        return unshard_local([local], layout)
    dim = layout.partition_dim
    gathered = all_gather_dim0(local.movedim(dim, 0).contiguous(), tp_group)
    pieces = [piece.movedim(0, dim) for piece in gathered.chunk(group_size(tp_group), dim=0)]
    return unshard_local(pieces, layout)


def parameter_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed from the run seed and a parameter's global name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def initialize_parameters(model: nn.Module, seed: int, tp_group: Group, prefix: str = "") -> None:
    """Fill every parameter of `model` from its master tensor, independent of the parallel layout.

    The master is built on the CPU in fp32 from `torch.Generator().manual_seed(parameter_seed(...))`
    so the values do not depend on device, tp size or dtype; the local shard is then cast and
    copied into place. `prefix` is prepended to the names (for a submodule of a larger model).
    """
    rank, size = group_rank(tp_group), group_size(tp_group)
    for name, param in model.named_parameters():
        layout = getattr(param, "param_layout", None)
        if layout is None:
            raise TypeError(f"parameter {prefix}{name} has no ParamLayout; create it with new_parameter")
        generator = torch.Generator().manual_seed(parameter_seed(seed, prefix + name))
        master = torch.empty(layout.master_shape, dtype=torch.float32)
        layout.init(master, generator)
        param.copy_(shard_master(master, layout, rank, size))
