"""DCP reads and writes over a given process group or within this process, and a safe metadata reader.

`group` is a group of a `ParallelState` (its `checkpoint_group`), never the default one: a state
whose ranks are a subset of the job (a one-process reference in a parity test) coordinates with
that subset only. `None` means this process alone, whether or not `torch.distributed` is
initialized: DCP's `no_dist` mode (torch >= 2.7), so a converter or a one-process generation run
inside a larger job never enters a collective that the other processes do not join.

DCP stores its metadata with pickle. `SafeFileSystemReader` reads it with an unpickler that only
builds DCP's own metadata classes and a few torch/builtin types, so opening a checkpoint never runs
code from the file; tensor data is read by DCP with `weights_only=True`.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlanner, SavePlanner

_ALLOWED_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)
_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP metadata classes, torch dtypes/layouts/memory formats and plain containers."""

    def find_class(self, module: str, name: str):
        if module.startswith(_ALLOWED_MODULE_PREFIXES) or (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        plain_type = (torch.dtype, torch.layout, torch.memory_format)
        if module == "torch" and isinstance(getattr(torch, name, None), plain_type):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except FileNotFoundError as error:
            message = f"{path.parent} is not a complete checkpoint: no .metadata file"
            raise FileNotFoundError(message) from error
        if not isinstance(metadata, Metadata):
            raise TypeError(f"{path} does not hold torch.distributed.checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def saved_tensors(path: Path) -> dict:
    """{key: DCP storage metadata} of checkpoint `path` (read through the safe unpickler)."""
    return SafeFileSystemReader(path).read_metadata().state_dict_metadata


@contextmanager
def _local_if(local: bool) -> Iterator[None]:
    """DCP warns that it assumes a single process whenever it runs without a group: that is the intent."""
    with warnings.catch_warnings():
        if local:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save(state: dict, writer: FileSystemWriter, planner: SavePlanner,
         group: dist.ProcessGroup | None) -> None:
    """Write `state` (collective over `group`; this process alone when it is None)."""
    with _local_if(group is None):
        dcp.save(state, storage_writer=writer, planner=planner, process_group=group, no_dist=group is None)


def load(state: dict, path: Path, planner: LoadPlanner, group: dist.ProcessGroup | None) -> None:
    """Fill `state` from checkpoint `path` (collective over `group`; this process alone when None)."""
    with _local_if(group is None):
        dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=planner, process_group=group,
                 no_dist=group is None)
