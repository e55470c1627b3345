"""From what a user names on the command line to one random-access source of records.

`--data-path` takes Megatron's forms: one path, several paths (equal weights), or weight/path pairs
(`0.7 llava_665k.json 0.3 shards/`). Each path is opened by what it is:

* a `.json` / `.jsonl` file: LLaVA conversation rows, or image-caption rows (`{"image", "caption"}`),
  told apart by the first rows;
* a `.tar` file, a directory of `.tar` shards, or a glob (`shards/part-*.tar`): webdataset-style shards;
* a `.parquet` file, a directory of them, or a glob (`data/train-*.parquet`), or a directory written by
  `datasets.Dataset.save_to_disk` (a `state.json` beside Arrow files): LLaVA or caption rows with
  the images inside (megamm.data.arrow_tables).

* a directory prepared by `energon prepare` (it holds `.nv-meta/`): a Megatron-Energon dataset, its
  train split (megamm.data.energon).

A directory is told by what it holds; one holding both `.tar` and `.parquet` files is refused, as is a
glob matching both.

Several sources are mixed by `BlendedSource` (deterministic, proportional in every prefix).
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

from megamm.data.arrow_tables import ArrowTableSource, saved_dataset_files
from megamm.data.energon import EnergonSource, is_energon_dataset
from megamm.data.sources import BlendedSource, CaptionSource, LlavaJsonSource, RecordSource, SourceError
from megamm.data.tar_shards import TarShardSource

# Rows looked at to tell conversation files from caption files.
_SNIFF_ROWS = 32


def parse_data_path(items: Sequence[str], flag: str = "--data-path") -> list[tuple[float, str]]:
    """`["a.json"]`, `["a.json", "b.json"]` or `["0.7", "a.json", "0.3", "b.json"]` -> (weight, path)s.

    ValueError naming `flag` when weights and paths are mixed up.
    """
    if not items:
        raise ValueError(f"{flag} is empty")

    def is_number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return not os.path.exists(text)

    if not is_number(items[0]):
        if any(is_number(item) for item in items):
            raise ValueError(f"{flag} {' '.join(items)}: give either only paths or weight/path pairs")
        return [(1.0, item) for item in items]
    if len(items) % 2:
        raise ValueError(f"{flag} {' '.join(items)}: weight/path pairs expected, got an odd count")
    pairs = []
    for weight, path in zip(items[0::2], items[1::2]):
        if not is_number(weight) or is_number(path):
            raise ValueError(f"{flag} {' '.join(items)}: expected 'weight path' pairs, got {weight!r} {path!r}")
        if float(weight) < 0:
            raise ValueError(f"{flag}: negative weight {weight} for {path}")
        pairs.append((float(weight), path))
    return pairs


# File name endings of the formats a glob or a directory of files may hold.
_FILE_FORMATS = {".tar": "tar", ".parquet": "parquet"}
# What --data-path accepts, for the message about a path that is none of it.
FORMATS_TEXT = ("LLaVA or caption rows in JSON / JSONL, .tar shards (a file, directory or glob), Parquet files, "
                "a save_to_disk directory or an Energon dataset directory")


def _format_of_files(path: str, files: list[str], flag: str) -> str:
    """'tar' or 'parquet' for a list of files of one format; ValueError naming the path otherwise."""
    formats = {_FILE_FORMATS.get(os.path.splitext(f)[1]) for f in files}
    if None in formats or len(formats) != 1:
        raise ValueError(
            f"{flag} {path}: expected only .tar or only .parquet files, got "
            + ", ".join(sorted({os.path.basename(f) for f in files})[:5])
        )
    return formats.pop()


def _layout(path: str, flag: str) -> tuple[str, list[str]]:
    """(format, files) of one path, told by its name and what it holds, without reading records.

    Formats: "energon" (an Energon dataset directory), "tar" (webdataset shards), "parquet",
    "saved" (a save_to_disk directory), "json" (JSON or JSONL rows). FileNotFoundError for a path
    that does not exist or a glob or directory without data files, ValueError for mixed formats;
    both name `flag` and the path.
    """
    if os.path.isdir(path) and is_energon_dataset(path):  # before the tar check: it holds .tar shards
        return "energon", [path]
    if any(ch in path for ch in "*?["):
        found = sorted(glob.glob(path))
        if not found:
            raise FileNotFoundError(f"{flag} {path}: the pattern matches no file")
        return _format_of_files(path, found, flag), found
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "state.json")) or os.path.exists(os.path.join(path, "dataset_dict.json")):
            return "saved", saved_dataset_files(path)
        found = sorted(str(p) for p in Path(path).iterdir() if p.suffix in _FILE_FORMATS)
        if not found:
            raise FileNotFoundError(f"{flag} {path}: directory holds no .tar shards or .parquet files")
        return _format_of_files(path, found, flag), found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: no such file")
    if path.endswith(tuple(_FILE_FORMATS)):
        return _FILE_FORMATS[os.path.splitext(path)[1]], [path]
    return "json", [path]


def _looks_like_captions(path: str) -> bool:
    """True when the first rows are caption rows (no "conversations", a "caption" or "text")."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    rows: list = []
    if head[:1] == b"[":
        try:
            with open(path, "rb") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SourceError(f"{path} is not valid JSON: {error}") from error
        rows = data[:_SNIFF_ROWS] if isinstance(data, list) else []
    else:
        with open(path, "rb") as f:
            for line in f:
                if len(rows) >= _SNIFF_ROWS:
                    break
                try:
                    rows.append(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
    objects = [row for row in rows if isinstance(row, dict)]
    if not objects:
        return False
    captions = sum("conversations" not in row and ("caption" in row or "text" in row) for row in objects)
    return captions > len(objects) / 2


def open_source(path: str, image_folder: str | None) -> RecordSource:
    """One path -> its record source; FileNotFoundError / SourceError naming the path."""
    kind, files = _layout(path, "--data-path")
    if kind == "energon":
        return EnergonSource(path)
    if kind == "tar":
        return TarShardSource(files)
    if image_folder is not None and not os.path.isdir(image_folder):
        raise FileNotFoundError(f"--image-folder {image_folder}: no such directory")
    if kind in ("parquet", "saved"):
        return ArrowTableSource(files, image_folder)
    cls = CaptionSource if _looks_like_captions(path) else LlavaJsonSource
    return cls(path, image_folder)


def _json_problem(path: str) -> str | None:
    """Why `path` is not JSON / JSONL rows, or None: a JSON list must open with an object (or be
    empty), a JSONL file's first row must be one."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
        if head[:1] == b"[":
            return None if head[1:].lstrip()[:1] in (b"{", b"]") else "a JSON list whose first element is not an object"
        f.seek(0)
        line = f.readline().removeprefix(b"\xef\xbb\xbf")
        while line and not line.strip():
            line = f.readline()
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"neither a JSON list nor JSONL (first row: {error}); expected {FORMATS_TEXT}"
    return None if isinstance(row, dict) else f"the first JSONL row is a {type(row).__name__}, not an object"


def _tar_problem(shard: str) -> str | None:
    """Why the first member of tar shard `shard` cannot be read, or None."""
    try:
        with tarfile.open(shard, "r:") as tar:
            member = tar.next()
    except (tarfile.TarError, OSError) as error:
        return f"tar shard {shard} cannot be read: {error}"
    return None if member is not None else f"tar shard {shard} holds no members"


def probe_source(path: str, flag: str) -> None:
    """Check, before a run starts, that `path` exists and holds a format megamm reads, reading at
    most its first record (opening a source indexes whole files, which can take minutes).

    FileNotFoundError / SourceError / ValueError naming `flag` and the path."""
    kind, files = _layout(path, flag)
    first = files[0]
    problem = None
    if kind == "tar":
        problem = _tar_problem(first)
    elif kind == "parquet":
        with open(first, "rb") as f:
            problem = None if f.read(4) == b"PAR1" else f"{first} is not a Parquet file (no PAR1 magic)"
    elif kind == "saved" and not os.path.isfile(first):
        problem = f"{first}, listed by the dataset's state.json, is missing"
    elif kind == "json":
        problem = _json_problem(first)
    if problem is not None:
        raise SourceError(f"{flag} {path}: {problem}")


def build_source(
    data_path: Sequence[str], image_folder: str | None, seed: int, num_samples: int
) -> tuple[RecordSource, list[str]]:
    """The (blended) source for `--data-path`, and a one-line description of each part.

    A single path is used as it is (the loader shuffles it per epoch); several are blended into
    `num_samples` positions, each path getting its weight's share.
    """
    pairs = parse_data_path(data_path)
    sources = [open_source(path, image_folder) for _, path in pairs]
    described = [f"{path}: {len(source)} samples, weight {weight:g}" for (weight, path), source in zip(pairs, sources)]
    for (_, path), source in zip(pairs, sources):
        if len(source) == 0:
            raise SourceError(f"--data-path {path}: no samples")
    if len(sources) == 1:
        return sources[0], described
    return BlendedSource(sources, [w for w, _ in pairs], seed, num_samples), described
