"""Dataset readers: files on disk -> raw `Record`s (conversation turns + image references).

Nothing here tokenizes or decodes images; that happens later in the pipeline, inside data loader
workers. What this module guarantees is that every record it returns is structurally sound, and that a
single bad row never kills a run: a bad row raises `BadSample` naming the file, the row and what is
wrong, and `SkippingReader` turns that into a skipped sample (counted and logged) until most samples
are bad, which means the dataset or its configuration is broken and training stops.

Sources (all random access: `len(source)`, `source[i]`):

* `LlavaJsonSource` - LLaVA's JSON list file, or JSONL with one row per line. Rows are
  `{"id", "image": str | [str] | "images": [str], "conversations": [{"from", "value"}, ...]}`; rows
  without images are text-only.
* `CaptionSource` - image-caption pairs, `{"image": str, "caption" | "text": str}` per row, turned into a
  two-turn conversation (human "<image>", gpt caption).
* `TarShardSource` - webdataset-style uncompressed tar shards, `<key>.json` plus image members.

`BlendedSource` mixes several sources with given weights, deterministically (Megatron's blending).

Image placeholders. The number of "<image>" strings in a row's turns must equal its number of images,
so every image has a place in the token sequence. LLaVA's own loader tolerates one exception, which we
keep: a row with exactly one image and no placeholder gets "<image>\\n" prepended to its first human
turn (LLaVA's pretraining captions and some instruction data are written that way).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tarfile
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from megamm.data.images import ImageError, resolve_image_path

RecordKind = Literal["conversation", "caption", "text"]
IMAGE_PLACEHOLDER = "<image>"
# Image member extensions a tar shard sample may use (lower-cased before matching).
TAR_IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
_TAR_BLOCK = 512
_LOGGER = logging.getLogger(__name__)


class BadSample(ValueError):
    """One unusable sample. Its message names the file, the row (or tar key) and the problem.

    `kind` is a short category ("json", "schema", "placeholders", "image", "member") so that
    `SkippingReader` can count bad samples per reason without parsing messages.
    """

    def __init__(self, source: str, where: str, kind: str, reason: str) -> None:
        super().__init__(f"{source}: {where}: {reason}")
        self.source = source
        self.where = where
        self.kind = kind
        self.reason = reason


class SourceError(ValueError):
    """A whole file is unusable (not JSON, not a tar, truncated tar): no sample of it can be trusted."""


@dataclass
class Record:
    """One raw sample, before tokenization and image decoding.

    `images` holds resolved absolute paths for file sources and tar member names for shards; in the
    latter case `image_bytes` holds the encoded image files in the same order (None otherwise).
    """

    source: str
    index: int
    sample_id: str
    conversations: list[dict[str, str]]
    images: list[str]
    image_bytes: list[bytes] | None = None
    kind: RecordKind = "conversation"


class RecordSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


class _Invalid(ValueError):
    """Raised by the row parsers; the source wraps it into BadSample with the file and row."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# ----------------------------------------------------------------------------------------------------
# Row parsing (shared by the JSON sources and the tar shards)


def _row_image_names(row: dict[str, Any]) -> list[str]:
    """The image references of a row: "image" (a string, or a list as some LLaVA variants write) or
    "images" (a list). Both at once is ambiguous and refused."""
    if "image" in row and "images" in row:
        raise _Invalid("schema", "row has both 'image' and 'images'")
    value = row.get("image", row.get("images"))
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise _Invalid("schema", f"image field must be a non-empty string or a list of them, got {value!r}")
    return names


def _check_conversations(conversations: Any, num_images: int) -> list[dict[str, str]]:
    """Validate LLaVA turns and the placeholder count; return a copy (with the implicit placeholder)."""
    if not isinstance(conversations, list) or not conversations:
        raise _Invalid("schema", "'conversations' must be a non-empty list")
    turns: list[dict[str, str]] = []
    for t, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise _Invalid("schema", f"turn {t} is a {type(turn).__name__}, not an object")
        if not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise _Invalid("schema", f"turn {t} needs string 'from' and 'value', got {turn!r}")
        turns.append(dict(turn))
    placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns)
    if num_images == 1 and placeholders == 0:
        # LLaVA convention (see the module docstring): the single image goes before the first human turn.
        human = next((turn for turn in turns if turn["from"] == "human"), None)
        if human is None:
            raise _Invalid("placeholders", "one image and no '<image>' placeholder, and no human turn")
        human["value"] = f"{IMAGE_PLACEHOLDER}\n{human['value']}"
        placeholders = 1
    if placeholders != num_images:
        raise _Invalid(
            "placeholders", f"{placeholders} '<image>' placeholder(s) in the turns but {num_images} image(s)"
        )
    return turns


def _caption_conversations(row: dict[str, Any]) -> list[dict[str, str]]:
    caption = row.get("caption", row.get("text"))
    if not isinstance(caption, str) or not caption.strip():
        raise _Invalid("schema", f"caption row needs a non-empty string 'caption' or 'text', got {caption!r}")
    if IMAGE_PLACEHOLDER in caption:
        raise _Invalid("placeholders", "caption contains an '<image>' placeholder")
    return [{"from": "human", "value": IMAGE_PLACEHOLDER}, {"from": "gpt", "value": caption}]


def _sample_id(row: dict[str, Any], default: str) -> str:
    value = row.get("id")
    if value is None:
        return default
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    raise _Invalid("schema", f"'id' must be a string or an integer, got {value!r}")


# ----------------------------------------------------------------------------------------------------
# JSON / JSONL files


class _JsonRowsFile:
    """Random access to the rows of a JSON list file or a JSONL file.

    A JSON list is parsed once and kept (that is what the format allows). A JSONL file is scanned once
    for the byte offsets of its non-blank lines (8 bytes a row) and each access reads one line, so large
    files are not held in memory. The file is reopened per access, which keeps the object safe to use
    from forked data loader workers. The format is told from the first non-blank character: "[" is a
    JSON list, anything else JSONL.
    """

    def __init__(self, path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None) -> None:
        self.path = Path(path)
        self.name = os.fspath(path)
        self.image_root = None if image_root is None else Path(image_root)
        self._rows: list[Any] | None = None
        self._offsets = array("q")
        try:
            if self._first_char() == b"[":
                self._load_list()
            else:
                self._index_lines()
        except OSError as e:
            raise SourceError(f"cannot read {self.name}: {e}") from e

    def _first_char(self) -> bytes:
        with open(self.path, "rb") as f:
            head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
        return head[:1]

    def _load_list(self) -> None:
        try:
            with open(self.path, "rb") as f:
                rows = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceError(f"{self.name} is not valid JSON: {e}") from e
        self._rows = rows  # a list: the file starts with "["

    def _index_lines(self) -> None:
        offset = 0
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    self._offsets.append(offset)
                offset += len(line)

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else len(self._offsets)

    def _bad(self, index: int, kind: str, reason: str) -> BadSample:
        return BadSample(self.name, f"row {index}", kind, reason)

    def _raw_row(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: row {index} out of range (0..{len(self) - 1})")
        if self._rows is not None:
            row = self._rows[index]
        else:
            with open(self.path, "rb") as f:
                f.seek(self._offsets[index])
                line = f.readline()
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise self._bad(index, "json", f"malformed JSON line: {e}") from e
        if not isinstance(row, dict):
            raise self._bad(index, "schema", f"row is a {type(row).__name__}, not an object")
        return row

    def _resolve(self, names: list[str]) -> list[str]:
        if not names:
            return []
        root = self.image_root
        if root is None:
            raise _Invalid("image", "row has images but the source has no image_root")
        try:
            return [os.fspath(resolve_image_path(name, root)) for name in names]
        except ImageError as e:
            raise _Invalid("image", str(e)) from e

    def _parse(self, row: dict[str, Any], index: int) -> Record:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Record:
        row = self._raw_row(index)
        try:
            return self._parse(row, index)
        except _Invalid as e:
            raise self._bad(index, e.kind, e.reason) from None


class LlavaJsonSource(_JsonRowsFile):
    """LLaVA conversation rows from a JSON list or JSONL file; see the module docstring for the schema.

    Image paths are resolved under `image_root` (relative, or absolute inside it) and must exist;
    `../` escapes and symlinks leading outside are refused (`resolve_image_path`). Rows without images
    become `kind="text"` records. `image_root` may be None for a text-only dataset.
    """

    def _parse(self, row: dict[str, Any], index: int) -> Record:
        names = _row_image_names(row)
        conversations = _check_conversations(row.get("conversations"), len(names))
        return Record(
            source=self.name,
            index=index,
            sample_id=_sample_id(row, f"{self.path.name}:{index}"),
            conversations=conversations,
            images=self._resolve(names),
            kind="conversation" if names else "text",
        )


class CaptionSource(_JsonRowsFile):
    """Image-caption pairs (`{"image": str, "caption" | "text": str}` rows, JSONL or JSON list).

    Each row becomes the two turns human "<image>", gpt caption (LLaVA's pretraining format), with
    `kind="caption"`; the image is resolved and checked as in `LlavaJsonSource`.
    """

    def _parse(self, row: dict[str, Any], index: int) -> Record:
        names = _row_image_names(row)
        if len(names) != 1:
            raise _Invalid("schema", f"a caption row needs exactly one image, got {len(names)}")
        return Record(
            source=self.name,
            index=index,
            sample_id=_sample_id(row, f"{self.path.name}:{index}"),
            conversations=_caption_conversations(row),
            images=self._resolve(names),
            kind="caption",
        )


# ----------------------------------------------------------------------------------------------------
# Tar shards


@dataclass(frozen=True)
class _Member:
    name: str
    offset: int
    size: int


@dataclass
class _TarSample:
    shard: int
    key: str
    members: dict[str, _Member] = field(default_factory=dict)  # suffix ("json", "0.jpg") -> member
    problem: str | None = None


def _split_member_name(name: str) -> tuple[str, str] | None:
    """(key, suffix) of a safe member name, None for an unsafe one (absolute, `..`, backslash).

    As in webdataset, the key is the path up to the first "." of the last path component, so keys
    cannot contain dots; "./" prefixes are dropped.
    """
    if name.startswith("/") or "\\" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    directory, base = posixpath.join("", *parts[:-1]), parts[-1]
    stem, dot, suffix = base.partition(".")
    if not stem or not dot:
        return None
    return posixpath.join(directory, stem) if directory else stem, suffix


def _image_order(sample: _TarSample) -> list[_Member]:
    """The sample's image members, in order.

    Convention: a single image is `<key>.<ext>`; several are `<key>.<n>.<ext>` with n = 0, 1, ..., in
    increasing n (numerically, so 10 comes after 9). Mixing both forms, a gap in n, or two members for
    one n is refused. `ext` is jpg, jpeg, png or webp (any case); other members (.txt, .cls) are ignored.
    """
    single: list[_Member] = []
    numbered: dict[int, _Member] = {}
    for suffix, member in sample.members.items():
        head, _, ext = suffix.rpartition(".")
        if ext.lower() not in TAR_IMAGE_EXTENSIONS:
            continue
        if not head:
            single.append(member)
        elif head.isdigit():
            n = int(head)
            if n in numbered:
                raise _Invalid("member", f"two members for image {n}: {numbered[n].name}, {member.name}")
            numbered[n] = member
    if single and numbered:
        raise _Invalid("member", "mixes <key>.<ext> and <key>.<n>.<ext> image members")
    if len(single) > 1:
        raise _Invalid("member", f"several unnumbered images: {sorted(m.name for m in single)}")
    if numbered and sorted(numbered) != list(range(len(numbered))):
        raise _Invalid("member", f"image numbers must be 0..n-1, got {sorted(numbered)}")
    return single or [numbered[n] for n in sorted(numbered)]


class TarShardSource:
    """Samples from webdataset-style uncompressed tar shards.

    Members are grouped by key (see `_split_member_name`); a sample is `<key>.json`, holding a LLaVA row
    (with "conversations") or a caption row (with "caption" / "text"), plus its image members in the
    order given by `_image_order`. Any "image" field inside the JSON is ignored: the images are the
    members. Records carry the member names in `images` and their bytes in `image_bytes`.

    The index is built once, at construction, from the tar headers (tarfile); samples are in order of
    first appearance, shard by shard. Reading seeks to the recorded data offsets, so access is random and
    costs one open and a few reads. Compressed tars cannot be seeked into and are not supported.

    Raises at construction:
        SourceError: naming the shard, if it is not a tar, or is truncated or corrupt (a member's data
            running past the end of the file, or a damaged header where the end-of-archive block should
            be; tarfile itself silently stops at such a header).
    Reading a sample raises BadSample for an unsafe member name (absolute or with `..`), a non-regular
    member, a missing or malformed JSON, bad image member names, or a row failing validation.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        self.paths = [os.fspath(p) for p in paths]
        self._samples: list[_TarSample] = []
        self._by_key: dict[tuple[int, str], int] = {}
        for shard, path in enumerate(self.paths):
            self._index_shard(shard, path)

    def _index_shard(self, shard: int, path: str) -> None:
        try:
            file_size = os.path.getsize(path)
            with tarfile.open(path, "r:") as tar:
                infos = list(tar)
                end = tar.offset
            with open(path, "rb") as f:
                f.seek(end)
                trailer = f.read(_TAR_BLOCK)
        except (tarfile.TarError, OSError) as e:
            raise SourceError(f"tar shard {path}: cannot read: {e}") from e
        if len(trailer) < _TAR_BLOCK or trailer.count(0) != _TAR_BLOCK:
            raise SourceError(
                f"tar shard {path} is truncated or corrupt: no valid header or end-of-archive block at "
                f"byte {end} (file size {file_size})"
            )
        for info in infos:
            if info.isdir():
                continue
            if info.isfile() and info.offset_data + info.size > file_size:
                raise SourceError(
                    f"tar shard {path} is truncated: member {info.name!r} needs bytes up to "
                    f"{info.offset_data + info.size}, file has {file_size}"
                )
            split = _split_member_name(info.name)
            if split is None:
                # Its own entry, so the bad member is counted as one bad sample instead of failing the shard.
                sample = self._sample(shard, info.name)
                sample.problem = f"unsafe member name {info.name!r} (absolute, '..' or no extension)"
                continue
            key, suffix = split
            sample = self._sample(shard, key)
            if not info.isfile() or info.issparse():
                sample.problem = f"member {info.name!r} is not a regular file"
            elif suffix in sample.members:
                sample.problem = f"duplicate member {info.name!r}"
            else:
                sample.members[suffix] = _Member(info.name, info.offset_data, info.size)

    def _sample(self, shard: int, key: str) -> _TarSample:
        position = self._by_key.get((shard, key))
        if position is None:
            position = self._by_key[(shard, key)] = len(self._samples)
            self._samples.append(_TarSample(shard, key))
        return self._samples[position]

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def keys(self) -> list[tuple[str, str]]:
        """(shard path, key) of every sample, in index order."""
        return [(self.paths[s.shard], s.key) for s in self._samples]

    def index_of(self, shard: int, key: str) -> int:
        """The global index of sample `key` in shard number `shard` (KeyError if absent)."""
        return self._by_key[(shard, key)]

    def read(self, shard: int, key: str) -> Record:
        """The sample `key` of shard number `shard`."""
        return self[self.index_of(shard, key)]

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(f"tar sample {index} out of range (0..{len(self) - 1})")
        sample = self._samples[index]
        path = self.paths[sample.shard]
        try:
            return self._parse(sample, path, index)
        except _Invalid as e:
            raise BadSample(path, f"key {sample.key!r}", e.kind, e.reason) from None

    def _parse(self, sample: _TarSample, path: str, index: int) -> Record:
        if sample.problem is not None:
            raise _Invalid("member", sample.problem)
        meta = sample.members.get("json")
        if meta is None:
            raise _Invalid("member", f"no {sample.key}.json member")
        images = _image_order(sample)
        try:
            with open(path, "rb") as f:
                raw = [self._read_member(f, m) for m in [meta, *images]]
        except OSError as e:
            raise _Invalid("member", f"cannot read members: {e}") from e
        try:
            row = json.loads(raw[0])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _Invalid("json", f"malformed {meta.name}: {e}") from e
        if not isinstance(row, dict):
            raise _Invalid("schema", f"{meta.name} holds a {type(row).__name__}, not an object")
        if "conversations" in row:
            conversations = _check_conversations(row["conversations"], len(images))
            kind: RecordKind = "conversation" if images else "text"
        else:
            if len(images) != 1:
                raise _Invalid("schema", f"a caption sample needs exactly one image, got {len(images)}")
            conversations = _caption_conversations(row)
            kind = "caption"
        return Record(
            source=path,
            index=index,
            sample_id=_sample_id(row, sample.key),
            conversations=conversations,
            images=[m.name for m in images],
            image_bytes=raw[1:],
            kind=kind,
        )

    @staticmethod
    def _read_member(f: Any, member: _Member) -> bytes:
        f.seek(member.offset)
        data = f.read(member.size)
        if len(data) != member.size:
            raise _Invalid("member", f"{member.name} truncated: {len(data)} of {member.size} bytes")
        return data


# ----------------------------------------------------------------------------------------------------
# Skipping bad samples


@dataclass
class ReaderStats:
    """Counts of a SkippingReader: samples read, bad ones, and bad ones per BadSample.kind."""

    samples: int = 0
    bad: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class SkippingReader:
    """Reads a source, skipping bad samples instead of failing, until most samples are bad.

    A few bad rows are normal in web-scale data and must not stop a run, so `get` returns None for
    them, counts them per reason and logs one line each (through `log`; default: this module's logger
    at WARNING level). But a high bad fraction means a broken dataset or a wrong `image_root`, where
    silently training on the remainder would be wrong: once at least `min_samples_for_check` samples
    were read and more than `max_bad_fraction` of them are bad, `get` raises RuntimeError with the
    counts. Only BadSample is caught; other errors (a file vanishing, IndexError) propagate.
    """

    def __init__(
        self,
        source: RecordSource,
        max_bad_fraction: float = 0.5,
        min_samples_for_check: int = 100,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if min_samples_for_check < 1:
            raise ValueError(f"min_samples_for_check must be at least 1, got {min_samples_for_check}")
        self.source = source
        self.max_bad_fraction = max_bad_fraction
        self.min_samples_for_check = min_samples_for_check
        self.log = log if log is not None else _LOGGER.warning
        self._stats = ReaderStats()

    def __len__(self) -> int:
        return len(self.source)

    def get(self, index: int) -> Record | None:
        record: Record | None
        try:
            record = self.source[index]
        except BadSample as e:
            record = None
            self._stats.bad += 1
            self._stats.reasons[e.kind] = self._stats.reasons.get(e.kind, 0) + 1
            self.log(f"skipping bad sample ({e.kind}): {e}")
        self._stats.samples += 1
        stats = self._stats
        if stats.samples >= self.min_samples_for_check and stats.bad > self.max_bad_fraction * stats.samples:
            raise RuntimeError(
                f"most samples are bad: {stats.bad} of {stats.samples} read samples were bad "
                f"(more than max_bad_fraction={self.max_bad_fraction}); by reason: {stats.reasons}"
            )
        return record

    def stats(self) -> ReaderStats:
        """A copy of the counts so far."""
        return ReaderStats(self._stats.samples, self._stats.bad, dict(self._stats.reasons))


# ----------------------------------------------------------------------------------------------------
# Blending


class BlendedSource:
    """A weighted, deterministic mix of sources, `size` samples long (Megatron's blended dataset).

    The blended index is built once, greedily: position i (0-based) goes to the source with the largest
    deficit `w_j * (i + 1) - taken_j` (weights normalized to sum 1; ties go to the lower source number;
    zero-weight sources are never picked). This keeps every prefix of the mix within one sample of the
    exact proportions, so even a short run sees the intended mix, and it needs no randomness. Within a
    source, its k-th pick is sample `perm_e[k % n]` of its epoch `e = k // n`, where `perm_e` is a
    permutation seeded by (seed, source number, e): a source smaller than its share is cycled through in
    a fresh order each epoch rather than repeated in the same order. The mapping depends only on
    (lengths, weights, seed, size). Building costs O(size * number of sources) Python steps.
    """

    def __init__(
        self, sources: Sequence[RecordSource], weights: Sequence[float], seed: int, size: int
    ) -> None:
        if len(sources) != len(weights) or not sources:
            raise ValueError(
                f"need one weight per source and at least one source, got {len(sources)} "
                f"source(s) and {len(weights)} weight(s)"
            )
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
        if size < 0:
            raise ValueError(f"size must be non-negative, got {size}")
        self.sources = list(sources)
        self.seed = seed
        self.size = size
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        lengths = [len(s) for s in self.sources]
        for j, (w, n) in enumerate(zip(self.weights, lengths)):
            if w > 0 and n == 0:
                raise ValueError(f"source {j} has weight {weights[j]} but no samples")
        active = [j for j, w in enumerate(self.weights) if w > 0]
        source_ids = np.empty(size, dtype=np.int32)
        sample_ids = np.empty(size, dtype=np.int64)
        taken = [0] * len(self.sources)
        perms: dict[int, tuple[int, np.ndarray]] = {}
        for i in range(size):
            j, best = active[0], -float("inf")
            for s in active:  # strict ">" gives ties to the lower source number
                deficit = self.weights[s] * (i + 1) - taken[s]
                if deficit > best:
                    j, best = s, deficit
            epoch, position = divmod(taken[j], lengths[j])
            if perms.get(j, (-1, None))[0] != epoch:
                perms[j] = (epoch, np.random.default_rng([seed, j, epoch]).permutation(lengths[j]))
            source_ids[i] = j
            sample_ids[i] = perms[j][1][position]
            taken[j] += 1
        self._source_ids = source_ids
        self._sample_ids = sample_ids

    def __len__(self) -> int:
        return self.size

    def locate(self, index: int) -> tuple[int, int]:
        """(source number, index within that source) of blended sample `index`."""
        if not 0 <= index < self.size:
            raise IndexError(f"blended sample {index} out of range (0..{self.size - 1})")
        return int(self._source_ids[index]), int(self._sample_ids[index])

    def __getitem__(self, index: int) -> Record:
        j, k = self.locate(index)
        return self.sources[j][k]
