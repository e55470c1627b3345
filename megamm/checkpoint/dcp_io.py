"""DCP reads and writes over a given process group or within this process, and a safe metadata reader.

`group` is a group of a `ParallelState` (its `checkpoint_group`), never the default one: a state
whose ranks are a subset of the job (a one-process reference in a parity test) coordinates with
that subset only. `None` means this process alone, whether or not `torch.distributed` is
initialized: DCP's `no_dist` mode (torch >= 2.7), so a converter or a one-process generation run
inside a larger job never enters a collective that the other processes do not join.

DCP stores its metadata with pickle. `SafeFileSystemReader` reads it with an unpickler that only
builds DCP's own metadata classes and a few torch/builtin types, so opening a checkpoint never runs
code from the file; tensor data is read by DCP with `weights_only=True`. The metadata bytes are
walked opcode by opcode (`pickletools.genops`) before they are unpickled, so a corrupt length field
is found against the bytes actually there instead of becoming an allocation of that size (a bare
MemoryError); every failure to read the file is a CheckpointFormatError naming it.

Verification (`verify=True`, the default of every reader): the reader checks `.metadata` against
the checksum in the checkpoint's description before unpickling it, refuses a checkpoint whose
description does not cover every shard file the metadata refers to, and before reading data checks
the files this process's read plan touches, and only those: in a multi-rank load each rank hashes the
shard files it reads (a rank at another layout that reads every file hashes every file; a rank at the
saved layout mostly its own). Without verification a shard too short for the chunks the metadata
places in it is still an error naming the file, found by its size alone.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlanner
from torch.futures import Future

from megamm.checkpoint import format

METADATA = ".metadata"

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
    """DCP's file reader with the safe metadata unpickler and, given `files` (the description's
    checksums, megamm.checkpoint.format.described_files), verification of the files it reads. A
    file is hashed once per reader: reuse one reader for several loads of the same checkpoint (the
    converter's reader reads a shard file in many groups)."""

    def __init__(self, path: str | Path, files: dict[str, dict] | None = None) -> None:
        super().__init__(path)
        self.files = files
        self._verified: set[str] = set()

    def _verify(self, names: list[str]) -> None:
        todo = [name for name in names if name not in self._verified]
        problems = format.verify_files(self.path, self.files, todo)
        if problems:
            raise format.CheckpointFormatError("checkpoint verification failed:\n  - " + "\n  - ".join(problems))
        self._verified.update(todo)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self.path) / METADATA
        if self.files is not None:
            self._verify([METADATA])
        try:
            data = path.read_bytes()
        except FileNotFoundError as error:
            message = f"{path.parent} is not a complete checkpoint: no {METADATA} file"
            raise FileNotFoundError(message) from error
        try:
            for _ in pickletools.genops(data):
                pass
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except Exception as error:  # corrupt bytes fail in many ways (MemoryError, EOFError, ...): each is named
            raise format.CheckpointFormatError(f"{path} is corrupt: {type(error).__name__}: {error}") from error
        if not isinstance(metadata, Metadata):
            raise format.CheckpointFormatError(f"{path} does not hold torch.distributed.checkpoint metadata")
        if self.files is not None:
            stored = metadata.storage_data or {}
            uncovered = sorted({str(info.relative_path) for info in stored.values()} - set(self.files))
            if uncovered:
                raise format.CheckpointFormatError(
                    f"{Path(self.path) / format.DESCRIPTION} has no checksum of {', '.join(uncovered)}, which "
                    f"{path} refers to: the description does not cover the checkpoint")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Check the files `plan` reads (sizes always, checksums when verifying), then read them;
        a failure while reading is an error naming the files."""
        ends: dict[str, int] = {}
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            name = str(info.relative_path)
            ends[name] = max(ends.get(name, 0), info.offset + info.length)
        names = sorted(ends)
        if self.files is not None:
            self._verify(names)
        for name, end in ends.items():
            path = Path(self.path) / name
            size = path.stat().st_size if path.is_file() else None
            if size is None or size < end:
                found = "is missing" if size is None else f"has {size} bytes"
                raise format.CheckpointFormatError(f"{path} {found}: {METADATA} places chunks in it up to byte {end}")
        try:
            return super().read_data(plan, planner)
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
            raise format.CheckpointFormatError(f"{self.path}: reading {', '.join(names)} failed: "
                                               f"{type(error).__name__}: {error}") from error


def reader(path: Path, verify: bool = True) -> SafeFileSystemReader:
    """A reader of checkpoint `path`; with `verify`, checking its files against its description."""
    files = format.described_files(path, format.read_description(path)) if verify else None
    return SafeFileSystemReader(path, files)


def saved_tensors(path: Path, verify: bool = True) -> dict:
    """{key: DCP storage metadata} of checkpoint `path` (read through the safe unpickler; with
    `verify`, after `.metadata` was checked against the description)."""
    return reader(path, verify).read_metadata().state_dict_metadata


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


def load(state: dict, source: SafeFileSystemReader, planner: LoadPlanner, group: dist.ProcessGroup | None) -> None:
    """Fill `state` from the checkpoint `source` reads (`reader(path, verify)`; collective over
    `group`; this process alone when None). A verifying reader checks the files each process reads
    first (see the module docstring). DCP
    gathers the ranks' failures into a CheckpointException; when the failures are about the files
    (CheckpointFormatError), they become one CheckpointFormatError naming each rank's file."""
    with _local_if(group is None):
        try:
            dcp.load(state, storage_reader=source, planner=planner, process_group=group,
                     no_dist=group is None)
        except CheckpointException as error:
            named = {rank: failure[0] if isinstance(failure, tuple) else failure
                     for rank, failure in error.failures.items()}
            named = {rank: failure for rank, failure in named.items()
                     if isinstance(failure, format.CheckpointFormatError)}
            if not named:
                raise
            lines = "\n".join(f"rank {rank}: {failure}" for rank, failure in sorted(named.items()))
            raise format.CheckpointFormatError(lines) from error
