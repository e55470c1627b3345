"""Checkpoint directories: naming, atomic publication, `latest`, retention, safe metadata reading.

    <save>/iter_0000100/           DCP shards (__*_*.distcp), DCP metadata (.metadata), megamm.json
    <save>/latest                  the name of the newest complete checkpoint ("iter_0000100")
    <save>/iter_0000200.partial/   a save in progress (or one that crashed): never loaded

A save writes into `iter_N.partial`; once every rank has finished, rank 0 renames it to `iter_N`
and only then rewrites `latest` (through a temporary file and an atomic rename). A crash at any
point leaves the previous checkpoint complete and `latest` naming it.

DCP stores its metadata with pickle. `SafeFileSystemReader` reads it with an unpickler that only
builds DCP's own metadata classes and a few torch/builtin types, so opening a checkpoint never runs
code from the file; tensor data is read by DCP with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

LATEST = "latest"
DESCRIPTION = "megamm.json"
PARTIAL_SUFFIX = ".partial"
ITERATION_DIR = re.compile(r"^iter_(\d{7,})$")

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
        import torch

        if module.startswith(_ALLOWED_MODULE_PREFIXES) or (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{path.parent} is not a complete checkpoint: no .metadata file") from error
        if not isinstance(metadata, Metadata):
            raise TypeError(f"{path} does not hold torch.distributed.checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def iteration_dir(save: str | Path, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def partial_dir(save: str | Path, iteration: int) -> Path:
    return Path(str(iteration_dir(save, iteration)) + PARTIAL_SUFFIX)


def write_description(directory: Path, description: dict) -> None:
    (directory / DESCRIPTION).write_text(json.dumps(description, indent=2, sort_keys=True, default=str) + "\n")


def read_description(directory: Path) -> dict:
    path = Path(directory) / DESCRIPTION
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{directory} is not a megamm checkpoint: no {DESCRIPTION}") from error


def publish(save: str | Path, iteration: int, keep_last: int | None) -> Path:
    """Rank 0, after every rank finished writing: make the save visible and point `latest` at it."""
    final = iteration_dir(save, iteration)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial_dir(save, iteration), final)
    _fsync_dir(Path(save))
    tmp = Path(save) / f".{LATEST}.tmp"
    tmp.write_text(final.name + "\n")
    os.replace(tmp, Path(save) / LATEST)
    _fsync_dir(Path(save))
    if keep_last is not None:
        _remove_old(Path(save), keep_last, keep=final.name)
    return final


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_old(save: Path, keep_last: int, keep: str) -> None:
    complete = sorted(p for p in save.iterdir() if ITERATION_DIR.match(p.name))
    for old in complete[: max(0, len(complete) - keep_last)]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in save.glob(f"iter_*{PARTIAL_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)


def resolve(load: str | Path) -> Path | None:
    """The checkpoint directory `--load` names: `<dir>/latest`'s target, or `<dir>` itself when it
    is a checkpoint. None when `<dir>` holds no checkpoint yet (a first run that also saves there)."""
    load = Path(load)
    if (load / DESCRIPTION).exists():
        return load
    latest = load / LATEST
    if latest.exists():
        target = load / latest.read_text().strip()
        if not (target / DESCRIPTION).exists():
            raise FileNotFoundError(f"{latest} names {target.name}, which is not a complete checkpoint")
        return target
    if load.name.endswith(PARTIAL_SUFFIX):
        raise ValueError(f"{load} is an unfinished save and cannot be loaded")
    return None
