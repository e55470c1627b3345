"""How each parameter relates to its full ("master") tensor.

Every parameter megamm creates has a `ParamLayout`, part of its record in the module tree's table
(`megamm.parallel.params.ParamSpec`). It says how to build the master tensor (shape and init
function) and how the local tensor is cut from it:

- `partition_dim=None`: replicated across tp; the local tensor is the master.
- `partition_dim=d`: the master is split in `tp` equal chunks along `d` and rank r keeps chunk r.
- `fused_parts`: the master is a concatenation of parts along `d` (q, k, v of a fused QKV
  projection; gate and up of a SwiGLU fc1). Each part is split separately and rank r keeps
  `[part0_r, part1_r, ...]`, so the master keeps the natural, tp-independent layout
  `[q; k; v]` / `[gate; up]` while each rank computes with whole heads and whole channels.
- `padded_size`: rows appended as zeros along `d` before splitting (vocabulary padding). The
  padding depends on tp, the real rows do not, so tp=1 and tp=4 still start from the same model.

`parameter_seed` gives each parameter its own generator seed from the run seed and its global name
(`megamm.parallel.params.initialize_parameters` draws the masters from it).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megamm.parallel.mappings import Group, all_gather_dim0, group_size

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

    def local_shape(self, tp_size: int) -> tuple[int, ...]:
        shape = list(self.master_shape)
        if self.partition_dim is not None:
            full = self.padded_size or shape[self.partition_dim]
            if full % tp_size != 0:
                raise ValueError(f"size {full} along dim {self.partition_dim} not divisible by tp={tp_size}")
            shape[self.partition_dim] = full // tp_size
        return tuple(shape)


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
