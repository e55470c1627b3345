"""Write and read megamm checkpoints from one process, one tensor at a time.

Writing: DCP plans a save from each value's `__create_write_items__` (shape and dtype only) and
asks the planner for the data item by item while it writes (`FileSystemWriter` resolves tensors
one at a time on the CPU). `LazyTensor` defers reading and converting a tensor to that moment, so
a conversion holds about one tensor (one fused QKV or MLP weight) in memory, never the model.
One file per tensor (`single_file_per_rank=False`): torch's writer keeps a reference to every tensor
of a file until the file is closed, so a single file per rank would hold the whole model by the end.

The result is an ordinary megamm checkpoint (megamm.checkpoint.format): `model/<name>` in the
master layout, the training progress at iteration 0 (so `--load DIR --no-load-optim` starts a run
at step 0 with fresh optimizer state), no optimizer or generator states, written into
`iter_0000000.partial` and published by `format.publish`, as a training save is. Reads and writes
stay in this process (`dcp_io` without a group), also when `torch.distributed` is initialized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from megamm.checkpoint import dcp_io, format
from megamm.convert import ConversionError


class LazyTensor:
    """A tensor of known shape and dtype whose data `load()` produces when DCP writes it."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, load: Callable[[], torch.Tensor]) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.load = load

    def size(self) -> torch.Size:
        return self.shape

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        properties = TensorProperties(dtype=self.dtype)
        chunk = ChunkStorageMetadata(torch.Size((0,) * len(self.shape)), self.shape)
        return [WriteItem(index=MetadataIndex(fqn, chunk.offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk, properties=properties, size=self.shape))]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size((0,) * len(self.shape)), self.shape)]

    def materialize(self, name: str) -> torch.Tensor:
        tensor = self.load()
        if tuple(tensor.shape) != tuple(self.shape) or tensor.dtype != self.dtype:
            raise ConversionError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                                  f"planned {tuple(self.shape)} {self.dtype}")
        return tensor.contiguous()


class _LazySavePlanner(DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex):
        value = self.state_dict[index.fqn]
        return value.materialize(index.fqn) if isinstance(value, LazyTensor) else super().lookup_object(index)


def write_checkpoint(save: str | Path, tensors: dict[str, LazyTensor], layout: dict, config: dict,
                     **extra: object) -> Path:
    """Write `tensors` (keys are parameter names, or `hf_extra/...` keys) as iteration 0 of `save`,
    described with `layout`, the run config tree `config` and the `extra` fields; returns the
    published directory."""
    final = format.iteration_dir(save, 0)
    if final.exists():
        raise ConversionError(f"{final} already exists: choose an empty --save directory")
    directory = format.open_partial(save, 0)
    state: dict[str, LazyTensor | torch.Tensor] = {
        (k if k.startswith(format.HF_EXTRA) else format.model_key(k)): v for k, v in tensors.items()
    }
    state.update({format.ITERATION: format.scalar(0), format.CONSUMED_SAMPLES: format.scalar(0)})
    writer = FileSystemWriter(directory, single_file_per_rank=False, thread_count=1)
    dcp_io.save(state, writer, _LazySavePlanner(), group=None)
    return format.publish(save, 0, format.describe(0, layout, "none", config, **extra))


class CheckpointReader:
    """The tensors of a megamm checkpoint, read from one process in groups (not all at once);
    with `verify`, each file is checked against the description's checksums before it is read."""

    def __init__(self, load: str | Path, verify: bool = True) -> None:
        path = format.resolve(load)
        if path is None:
            raise ConversionError(f"{load}: no megamm checkpoint (expected a checkpoint directory or a save "
                                  f"directory with '{format.LATEST}')")
        self.path = path
        self.description = format.read_description(path)
        self.source = dcp_io.reader(path, verify)
        saved = self.source.read_metadata().state_dict_metadata
        self.tensors = {k: v for k, v in saved.items() if isinstance(v, TensorStorageMetadata)}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read the given keys (full tensors, dtype as saved)."""
        state = {k: torch.empty(self.shape(k), dtype=self.dtype(k)) for k in keys}
        if state:
            dcp_io.load(state, self.source, DefaultLoadPlanner(), group=None)
        return state
