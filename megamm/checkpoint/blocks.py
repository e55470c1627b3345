"""Tensors described as blocks of their global (master) tensor, for torch.distributed.checkpoint.

A checkpoint stores every tensor in its global, layout-independent form: a parameter under its
master shape (`[q; k; v]` for QKV, the real vocabulary rows for embeddings), optimizer states in
the parameter's 2-D view `[d0, d1 * d2 * ...]`. Each rank contributes the rectangular blocks it
holds, with their offsets in the global tensor; duplicates (data-parallel replicas, tensors
replicated across tp) are written once, and loading at another layout reads whatever blocks the
new layout needs. That is what lets a checkpoint move between tp, pp and dp sizes, with the plain
or the distributed optimizer.

`BlockTensor` plugs into DCP's planner through its `__create_write_items__` /
`__create_chunk_list__` hooks (the ones DTensor uses); `BlockSavePlanner` / `BlockLoadPlanner`
resolve a block by its offset.

This is the only module of the checkpoint layer that reads parameter layouts (the modules'
ParamSpec records): `model_blocks` and `optimizer_blocks` turn parameters and their optimizer
tensors into blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from megamm.checkpoint.format import model_key
from megamm.parallel.mappings import Group
from megamm.parallel.params import param_specs
from megamm.parallel.sharding import ParamLayout
from megamm.parallel.state import ParallelState


class BlockTensor:
    """A global tensor of `shape` of which this rank holds `blocks`: {offsets: local tensor}."""

    def __init__(self, shape: tuple[int, ...], blocks: dict[tuple[int, ...], torch.Tensor]) -> None:
        self.shape = torch.Size(shape)
        self.blocks = blocks

    def size(self) -> torch.Size:
        return self.shape

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(torch.Size(offsets), block.shape),
                    properties=TensorProperties.create_from_tensor(block),
                    size=self.shape,
                ),
            )
            for offsets, block in self.blocks.items()
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(offsets), block.shape) for offsets, block in self.blocks.items()]

    def block(self, offsets: torch.Size) -> torch.Tensor:
        return self.blocks[tuple(offsets)]

    @classmethod
    def whole(cls, tensor: torch.Tensor) -> BlockTensor:
        """A tensor every rank holds entirely (a scalar, a generator state), as one block."""
        return cls(tuple(tensor.shape), {(0,) * tensor.dim(): tensor})

    def cpu_copy(self) -> BlockTensor:
        """The same blocks copied to the CPU (the snapshot an asynchronous save writes)."""
        return BlockTensor(tuple(self.shape), {o: b.detach().to("cpu", copy=True) for o, b in self.blocks.items()})


class BlockSavePlanner(DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex):
        value = self.state_dict[index.fqn]
        return value.block(index.offset) if isinstance(value, BlockTensor) else super().lookup_object(index)


class BlockLoadPlanner(DefaultLoadPlanner):
    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # The default set-up only knows tensors and drops other leaves; keep ours beside it.
        blocks = {k: v for k, v in state_dict.items() if isinstance(v, BlockTensor)}
        rest = {k: v for k, v in state_dict.items() if k not in blocks}
        super().set_up_planner(rest, metadata, is_coordinator)
        self.state_dict.update(blocks)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        value = self.state_dict[index.fqn]
        return value.block(index.offset) if isinstance(value, BlockTensor) else super().lookup_tensor(index)


# ---- where a rank's local tensor sits in the master tensor -----------------------------------------


@dataclass(frozen=True)
class RowSegment:
    """Local rows `[start, stop)` are master rows `[master_start, master_start + stop - start)`."""

    start: int
    stop: int
    master_start: int


def view_2d_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view used for blocks: `[d0, d1 * d2 * ...]` (1-D tensors are `[d0, 1]`)."""
    if len(shape) == 0:
        return (1, 1)
    return (shape[0], math.prod(shape[1:]))


def row_segments(layout: ParamLayout, local_rows: int, tp_rank: int, tp_size: int) -> list[RowSegment]:
    """How the local rows map to master rows (see megamm.parallel.sharding for the layouts)."""
    if layout.partition_dim != 0:
        return [RowSegment(0, local_rows, 0)]
    if layout.fused_parts:
        segments, local_start, master_start = [], 0, 0
        for part in layout.fused_parts:
            size = part // tp_size
            segments.append(RowSegment(local_start, local_start + size, master_start + tp_rank * size))
            local_start += size
            master_start += part
        return segments
    base = tp_rank * local_rows
    real = min(local_rows, layout.master_shape[0] - base)  # rows past the vocabulary are padding
    return [RowSegment(0, real, base)] if real > 0 else []


def span_rectangles(start: int, stop: int, columns: int) -> list[tuple[int, int, int, int]]:
    """Cover the flat range `[start, stop)` of a row-major `[*, columns]` tensor with at most three
    rectangles `(row0, row1, col0, col1)`, each contiguous in memory."""
    first_row, first_col = divmod(start, columns)
    last_row, last_col = divmod(stop, columns)
    if first_row == last_row:
        return [(first_row, first_row + 1, first_col, last_col)] if last_col > first_col else []
    rectangles = []
    if first_col:
        rectangles.append((first_row, first_row + 1, first_col, columns))
        first_row += 1
    if last_row > first_row:
        rectangles.append((first_row, last_row, 0, columns))
    if last_col:
        rectangles.append((last_row, last_row + 1, 0, last_col))
    return rectangles


def master_blocks(
    data: torch.Tensor,
    layout: ParamLayout,
    local_shape: tuple[int, ...],
    tp_rank: int,
    tp_size: int,
    span: tuple[int, int] | None = None,
) -> dict[tuple[int, int], torch.Tensor]:
    """This rank's blocks of the master tensor's 2-D view, as views of `data`.

    data: the whole local tensor (any shape with `local_shape`'s element count), or, with `span`,
    the flat elements `[span[0], span[1])` of it (a distributed-optimizer piece).
    Returns {(row, col) offsets in the master 2-D view: 2-D view of the block}.
    """
    rows, columns = view_2d_shape(local_shape)
    flat = data.reshape(-1)
    start, stop = span if span is not None else (0, rows * columns)
    column_offset = tp_rank * columns if layout.partition_dim == 1 and tp_size > 1 else 0
    if layout.partition_dim == 1 and len(local_shape) != 2:
        raise ValueError(f"column-partitioned tensors must be 2-D, got shape {local_shape}")
    blocks = {}
    for row0, row1, col0, col1 in span_rectangles(start, stop, columns):
        for segment in row_segments(layout, rows, tp_rank, tp_size):
            lo, hi = max(row0, segment.start), min(row1, segment.stop)
            if lo >= hi:
                continue
            # Rectangles are full-width or a single row, so the block is one contiguous run.
            first = lo * columns + col0 - start
            block = flat[first : first + (hi - lo - 1) * columns + (col1 - col0)].view(hi - lo, col1 - col0)
            blocks[(segment.master_start + lo - segment.start, column_offset + col0)] = block
    return blocks


def parameter_blocks(tensor: torch.Tensor, layout: ParamLayout, tp_rank: int, tp_size: int) -> BlockTensor:
    """A model parameter (or its grad-shaped twin) as blocks of its master tensor's real shape."""
    master_shape = tuple(layout.master_shape)
    blocks = master_blocks(tensor, layout, tuple(tensor.shape), tp_rank, tp_size)
    if len(master_shape) == 2:
        return BlockTensor(master_shape, blocks)
    if layout.partition_dim is None:
        return BlockTensor(master_shape, {(0,) * len(master_shape): tensor})
    if len(master_shape) != 1:
        raise ValueError(f"partitioned parameters must be 1-D or 2-D, got master shape {master_shape}")
    return BlockTensor(master_shape, {(row,): block.reshape(-1) for (row, _), block in blocks.items()})


def model_blocks(modules: Iterable[nn.Module], state: ParallelState) -> dict[str, BlockTensor]:
    """`model/<name>` -> this rank's blocks of every parameter of `modules` (views of the data)."""
    blocks = {}
    for module in modules:
        specs = param_specs(module)
        for name, p in module.named_parameters():
            blocks[model_key(name)] = parameter_blocks(p.data, specs[name].layout, state.tp_rank, state.tp_size)
    return blocks


def optimizer_blocks(param: nn.Parameter, layout: ParamLayout,
                     pieces: list[tuple[torch.Tensor, tuple[int, int] | None]], state: ParallelState) -> BlockTensor:
    """One optimizer tensor (master or moment) of `param` (whose layout is `layout`) in the
    parameter's 2-D master view.

    pieces: (data, span) for each piece of the parameter this rank holds: the whole local tensor
    with span None (plain optimizer), or the flat elements `[span[0], span[1])` of it (distributed).
    """
    blocks = {}
    for data, span in pieces:
        blocks.update(master_blocks(data, layout, tuple(param.shape), state.tp_rank, state.tp_size, span))
    return BlockTensor(view_2d_shape(tuple(layout.master_shape)), blocks)


def gathered_shapes(request: Mapping[str, BlockTensor], group: Group) -> dict[str, tuple[int, ...]]:
    """{key: global shape} over every rank's request (the whole model, every pipeline stage), what
    the fit check compares a checkpoint with. Collective over `group` (None: this process's own)."""
    mine = {key: tuple(value.shape) for key, value in request.items()}
    if group is None:
        return mine
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine, group=group)
    return {key: shape for part in parts for key, shape in part.items()}
