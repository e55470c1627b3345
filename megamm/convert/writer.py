"""Write and read megamm checkpoints from one process, one tensor at a time.

Writing: DCP plans a save from each value's `__create_write_items__` (shape and dtype only) and
asks the planner for the data item by item while it writes (`FileSystemWriter` resolves tensors
one at a time on the CPU). `LazyTensor` defers reading and converting a tensor to that moment, so
a conversion holds about one tensor (one fused QKV or MLP weight) in memory, never the model.
One file per tensor (`single_file_per_rank=False`): torch's writer keeps a reference to every tensor
of a file until the file is closed, so a single file per rank would hold the whole model by the end.

The result is an ordinary megamm checkpoint: `model/<name>` in the master layout, the training
progress at iteration 0 (so `--load DIR --no-load-optim` starts a run at step 0 with fresh
optimizer state), no optimizer or generator states, written into `iter_0000000.partial` and
published with the same atomic rename and `latest` update as a training save.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

import megamm
from megamm.checkpoint import storage
from megamm.convert import ConversionError


@contextmanager
def _single_process() -> Iterator[None]:
    """DCP warns that it assumes a single process when no process group exists: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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


def _progress() -> dict[str, torch.Tensor]:
    # Same keys, shapes and dtypes as megamm.checkpoint.checkpointer's progress state.
    return {"train/iteration": torch.zeros(1, dtype=torch.float64),
            "train/consumed_samples": torch.zeros(1, dtype=torch.float64)}


def write_checkpoint(save: str | Path, tensors: dict[str, LazyTensor], description: dict) -> Path:
    """Write `tensors` (keys without the `model/` prefix, or `hf_extra/...`) as iteration 0 of
    `save`; returns the published directory. `description` is completed with the format fields."""
    save = Path(save)
    save.mkdir(parents=True, exist_ok=True)
    final = storage.iteration_dir(save, 0)
    if final.exists():
        raise ConversionError(f"{final} already exists: choose an empty --save directory")
    directory = storage.partial_dir(save, 0)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir()
    state = {**{(k if k.startswith("hf_extra/") else f"model/{k}"): v for k, v in tensors.items()}, **_progress()}
    with _single_process():
        dcp.save(state, storage_writer=FileSystemWriter(directory, single_file_per_rank=False, thread_count=1), planner=_LazySavePlanner(),
                 no_dist=True)
    storage.write_description(directory, {
        "format": "megamm-dcp-1", "megamm_version": megamm.__version__, "torch_version": torch.__version__,
        "iteration": 0, "optimizer": "none", "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **description,
    })
    return storage.publish(save, 0, None)


class CheckpointReader:
    """The tensors of a megamm checkpoint, read from one process in groups (not all at once)."""

    def __init__(self, load: str | Path) -> None:
        path = storage.resolve(load)
        if path is None:
            raise ConversionError(f"{load}: no megamm checkpoint (expected a checkpoint directory or a save "
                                  f"directory with '{storage.LATEST}')")
        self.path = path
        self.description = storage.read_description(path)
        metadata = storage.SafeFileSystemReader(path).read_metadata().state_dict_metadata
        self.tensors = {k: v for k, v in metadata.items() if isinstance(v, TensorStorageMetadata)}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read the given keys (full tensors, dtype as saved)."""
        state = {k: torch.empty(self.shape(k), dtype=self.dtype(k)) for k in keys}
        if state:
            with _single_process():
                dcp.load(state, storage_reader=storage.SafeFileSystemReader(self.path), planner=DefaultLoadPlanner(),
                         no_dist=True)
        return state
