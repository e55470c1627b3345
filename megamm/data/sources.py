"""Dataset readers: files on disk -> raw `Record`s (conversation turns + image references).

Nothing here tokenizes or decodes images; that happens later in the pipeline, inside data loader
workers. What this module guarantees is that every record it returns is structurally sound, and that a
single bad row never kills a run: a bad row raises `BadSample` naming the file, the row and what is
wrong, and `SkippingReader` turns that into a skipped sample (counted and logged) until most samples
are bad, which means the dataset or its configuration is broken and training stops.

Sources (all random access: `len(source)`, `source[i]`):

* `LlavaJsonSource` - LLaVA's JSON list file, or JSONL with one row per line. Rows are
  `{"id", "image": str | [str] | "images": [str], "conversations": [{"from", "value"}, ...]}`; rows
  without images are text-only. A row may also hold videos (`"video"` / `"videos"`, see
  `_row_videos`), which the native-resolution (Qwen2-VL) family reads.
* `CaptionSource` - image-caption pairs, `{"image": str, "caption" | "text": str}` per row, turned into a
  two-turn conversation (human "<image>", gpt caption).
* `TarShardSource` (megamm.data.tar_shards) - webdataset-style uncompressed tar shards, `<key>.json`
  plus image and video members; Parquet / Arrow tables (megamm.data.arrow_tables) and Energon
  datasets (megamm.data.energon) likewise hold their images and videos inside.

`BlendedSource` mixes several sources with given weights, deterministically (Megatron's blending).

Image placeholders. The number of "<image>" strings in a row's turns must equal its number of images,
so every image has a place in the token sequence. LLaVA's own loader tolerates one exception, which we
keep: a row with exactly one image and no placeholder gets "<image>\\n" prepended to its first human
turn (LLaVA's pretraining captions and some instruction data are written that way). Videos likewise:
the number of "<video>" strings must equal the number of videos, one video and no "<video>" gets one
before the first human turn, and a row with one video, no image and one "<image>" but no "<video>"
(LLaVA-Video's rows) reads that placeholder as the video.
"""

from __future__ import annotations

import json
import logging
import os
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from megamm.data.images import ImageError, resolve_image_path
from megamm.data.qwen_template import VIDEO_PLACEHOLDER

RecordKind = Literal["conversation", "caption", "text"]
IMAGE_PLACEHOLDER = "<image>"
# The rate a video given as frame files was extracted at when its row does not say (qwen-vl-utils'
# assumption for frame lists).
DEFAULT_FRAME_RATE = 2.0
# Image member extensions a tar shard sample may use (lower-cased before matching).
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
    `videos` holds one entry per "<video>" in order: a video file, or its frame images (a list, in
    order, extracted at `frame_rate` frames per second); as resolved paths for JSON rows, as names
    (tar members, table cells) with the encoded files in `video_bytes` (the same nesting: an encoded
    video, or a list of encoded frames) for the formats that hold their videos inside.
    """

    source: str
    index: int
    sample_id: str
    conversations: list[dict[str, str]]
    images: list[str]
    image_bytes: list[bytes] | None = None
    kind: RecordKind = "conversation"
    videos: list[str | list[str]] = field(default_factory=list)
    frame_rate: float = DEFAULT_FRAME_RATE
    video_bytes: list[bytes | list[bytes]] | None = None


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


def _row_videos(row: dict[str, Any]) -> tuple[list[str | list[str]], float]:
    """The video references of a row and the rate its frame lists were extracted at.

    "video" is one video, "videos" a list of them (both at once is refused); a video is a video file
    path (a string) or its frames (a non-empty list of image paths, in order). "frame_rate" (frames per
    second of the frame lists, default DEFAULT_FRAME_RATE) must be positive.
    """
    if "video" in row and "videos" in row:
        raise _Invalid("schema", "row has both 'video' and 'videos'")
    if "video" in row:
        videos = [row["video"]]
    else:
        videos = row.get("videos", [])
        if not isinstance(videos, list):
            raise _Invalid("schema", f"'videos' must be a list of videos, got {videos!r}")
    for number, video in enumerate(videos):
        frames = isinstance(video, list) and video and all(isinstance(f, str) and f for f in video)
        if not (isinstance(video, str) and video) and not frames:
            raise _Invalid("schema", f"video {number} must be a video file path or a non-empty list of frame "
                                     f"paths, got {video!r}")
    return videos, _frame_rate(row)


def _frame_rate(row: dict[str, Any]) -> float:
    """The row's "frame_rate": frames per second its frame-list videos were extracted at (positive;
    default DEFAULT_FRAME_RATE, also for a null table cell)."""
    rate = row.get("frame_rate")
    if rate is None:
        return DEFAULT_FRAME_RATE
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise _Invalid("schema", f"'frame_rate' must be a positive number of frames per second, got {rate!r}")
    return float(rate)


def _check_conversations(conversations: Any, num_images: int, num_videos: int = 0) -> list[dict[str, str]]:
    """Validate LLaVA turns and the placeholder counts; return a copy (with the implicit placeholders)."""
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
    videos = sum(turn["value"].count(VIDEO_PLACEHOLDER) for turn in turns)
    if num_videos == 1 and videos == 0 and num_images == 0 and placeholders == 1:
        # LLaVA-Video's rows mark their one video with "<image>".
        for turn in turns:
            turn["value"] = turn["value"].replace(IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
        placeholders, videos = 0, 1
    elif num_videos == 1 and videos == 0:
        human = next((turn for turn in turns if turn["from"] == "human"), None)
        if human is None:
            raise _Invalid("placeholders", "one video and no '<video>' placeholder, and no human turn")
        human["value"] = f"{VIDEO_PLACEHOLDER}\n{human['value']}"
        videos = 1
    if placeholders != num_images:
        raise _Invalid(
            "placeholders", f"{placeholders} '<image>' placeholder(s) in the turns but {num_images} image(s)"
        )
    if videos != num_videos:
        raise _Invalid(
            "placeholders", f"{videos} '<video>' placeholder(s) in the turns but {num_videos} video(s)"
        )
    return turns


def _caption_conversations(row: dict[str, Any]) -> list[dict[str, str]]:
    caption = row.get("caption", row.get("text"))
    if not isinstance(caption, str) or not caption.strip():
        raise _Invalid("schema", f"caption row needs a non-empty string 'caption' or 'text', got {caption!r}")
    if IMAGE_PLACEHOLDER in caption:
        raise _Invalid("placeholders", "caption contains an '<image>' placeholder")
    return [{"from": "human", "value": IMAGE_PLACEHOLDER}, {"from": "gpt", "value": caption}]


def _row_conversations(
    row: dict[str, Any], conversations: Any, num_images: int, llava: bool, num_videos: int = 0
) -> tuple[list[dict[str, str]], RecordKind]:
    """A row's turns and kind: its checked LLaVA `conversations` (placeholders counted against the
    images and videos) when `llava`, else the caption row's two turns (a caption row takes exactly one
    image and no video). Shared by the formats whose rows may be either (tar shards, tables, Energon)."""
    if llava:
        kind: RecordKind = "conversation" if num_images or num_videos else "text"
        return _check_conversations(conversations, num_images, num_videos), kind
    if num_images != 1 or num_videos:
        raise _Invalid("schema", f"a caption row needs exactly one image and no video, got {num_images} "
                                 f"image(s) and {num_videos} video(s)")
    return _caption_conversations(row), "caption"


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

    def _resolve(self, names: list[str], what: str = "images") -> list[str]:
        if not names:
            return []
        root = self.image_root
        if root is None:
            raise _Invalid("image", f"row has {what} but the source has no image_root")
        try:
            return [os.fspath(resolve_image_path(name, root)) for name in names]
        except ImageError as e:
            raise _Invalid("image", str(e)) from e

    def _resolve_videos(self, videos: list[str | list[str]]) -> list[str | list[str]]:
        """Video files and frame files resolved under the image root, as images are."""
        return [
            self._resolve([video], "videos")[0] if isinstance(video, str) else self._resolve(video, "videos")
            for video in videos
        ]

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
        videos, frame_rate = _row_videos(row)
        conversations = _check_conversations(row.get("conversations"), len(names), len(videos))
        return Record(
            source=self.name,
            index=index,
            sample_id=_sample_id(row, f"{self.path.name}:{index}"),
            conversations=conversations,
            images=self._resolve(names),
            kind="conversation" if names or videos else "text",
            videos=self._resolve_videos(videos),
            frame_rate=frame_rate,
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
