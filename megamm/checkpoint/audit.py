"""Check a checkpoint directory without loading it: every problem a load could meet, listed at once.

Used by `tools/checkpoint_info.py --verify`. What is checked, in order:

- the description (`megamm.json`) is readable and lists a checksum for every file of the directory;
- every listed file is present, of the listed size and checksum (megamm.checkpoint.integrity);
- DCP's `.metadata` is readable (through the safe unpickler);
- every tensor's chunks tile the tensor and each chunk has a storage entry, and every shard file
  the metadata refers to is present with enough bytes for the chunks placed in it.

Reading and hashing every file is the cost of this check (about the time to read the directory);
the tensors are never deserialized.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

from megamm.checkpoint import dcp_io, format


def audit(path: Path) -> list[str]:
    """Every problem of checkpoint directory `path`, one line each; [] when it is sound."""
    try:
        description = format.read_description(path)
    except (FileNotFoundError, format.CheckpointFormatError) as error:
        return [str(error)]
    problems = []
    try:
        files = format.described_files(path, description)
    except format.CheckpointFormatError as error:
        problems.append(str(error))
        files = {}
    on_disk = {p.name for p in Path(path).iterdir() if p.is_file() and p.name != format.DESCRIPTION}
    if files:
        problems += [f"{Path(path) / name} has no checksum in {Path(path) / format.DESCRIPTION}"
                     for name in sorted(on_disk - set(files))]
        problems += format.verify_files(path, files)
    try:
        metadata = dcp_io.SafeFileSystemReader(path).read_metadata()
    except (FileNotFoundError, format.CheckpointFormatError) as error:
        return [*problems, str(error)]
    return problems + _layout_problems(Path(path), metadata)


def _layout_problems(path: Path, metadata: Metadata) -> list[str]:
    """Chunks that do not tile their tensor, chunks without storage, shard files missing or short."""
    problems = []
    storage = metadata.storage_data or {}
    stored_keys = {index.fqn for index in storage}
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            if key not in stored_keys:
                problems.append(f"{path / dcp_io.METADATA}: {key} has no storage entry")
            continue
        covered = sum(math.prod(chunk.sizes) for chunk in entry.chunks)
        if covered != math.prod(entry.size):
            problems.append(f"{path / dcp_io.METADATA}: the chunks of {key} hold {covered} of its "
                            f"{math.prod(entry.size)} elements")
        stored = [chunk for chunk in entry.chunks if MetadataIndex(key, chunk.offsets) not in storage]
        if stored:
            problems.append(f"{path / dcp_io.METADATA}: {len(stored)} chunk(s) of {key} have no storage entry")
    ends: dict[str, int] = {}
    for info in storage.values():
        name = str(info.relative_path)
        ends[name] = max(ends.get(name, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        shard = path / name
        if not shard.is_file():
            problems.append(f"{shard} is missing: {dcp_io.METADATA} places chunks in it")
        elif shard.stat().st_size < end:
            problems.append(f"{shard} has {shard.stat().st_size} bytes: {dcp_io.METADATA} places chunks in it "
                            f"up to byte {end}")
    return problems
