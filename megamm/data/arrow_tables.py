"""Parquet files and Hugging Face `save_to_disk` directories (Arrow IPC) as record sources.

Accepted schemas (one per dataset, decided from the columns when the source is opened):

* **Conversations** - a `conversations` column: a list of `{"from", "value"}` structs, or a string
  holding that list as JSON (some exports write it so). Images, if any, come from one image column:
  `image` (one image, or a list) or `images` (a list); both at once is refused, as in the JSON rows.
* **Captions** - no `conversations`, but a `caption` (or `text`) string column and exactly one image per
  row; each row becomes the turns human "<image>", gpt caption, as `CaptionSource` does.

An image value is the Hugging Face `datasets` Image feature, a struct `{"bytes": binary, "path":
string}`, or plain `binary` (the encoded file), or a `string` path; a list column holds several. A
struct with no bytes but a path, and a string, name a file resolved under `--image-folder` exactly as
the JSON rows' paths are (escapes refused). An optional `id` column (string or integer) names the
sample. A null image list or null image column value means a text-only row.

Videos (the native-resolution family reads them) come from one video column, `video` (one video a
row) or `videos` (a list); both at once is refused. A video is a video file held like an image (a
`{bytes, path}` struct, `binary`, a `string` path: read and decoded with PyAV) or its frames, a list
of image values in order, taken at the row's `frame_rate` (an optional number column, default 2 per
second). Whether a video column holds files or frames is decided from its type when the source is
opened. A null video value means a row without videos.

Access is random by row and reads only what it needs: a Parquet file is opened memory-mapped and a row
reads its row group (the needed columns only), of which the last few are kept (`cache_row_groups`);
Hugging Face writes image datasets in row groups of 100 rows, so a random row costs about 100 rows'
bytes. An Arrow IPC file (what `save_to_disk` writes, stream or file format) is memory-mapped whole and
rows are zero-copy slices. Files are opened lazily in each process, so the source is safe to use from
forked data loader workers. A bad row raises `BadSample` naming the file and its row in that file.
"""

from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from megamm.data.images import ImageError, resolve_image_path
from megamm.data.sources import (
    BadSample,
    Record,
    SourceError,
    _frame_rate,
    _Invalid,
    _row_conversations,
    _sample_id,
)

if TYPE_CHECKING:
    import pyarrow as pa

INSTALL_HINT = "pip install megamm[parquet]"
IMAGE_COLUMNS = ("image", "images")
VIDEO_COLUMNS = ("video", "videos")
CAPTION_COLUMNS = ("caption", "text")
# Row groups kept per Parquet file: a permutation rarely hits the same group twice in a row, so a
# small cache only serves the sequential case; larger caches cost memory for image columns.
DEFAULT_CACHE_ROW_GROUPS = 2
_ARROW_FILE_MAGIC = b"ARROW1"
TableSchema = Literal["conversations", "captions"]


def _pyarrow(path: str) -> Any:
    """The pyarrow module, or an ImportError naming the dataset and the extra to install."""
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as error:
        raise ImportError(f"--data-path {path}: reading Parquet/Arrow data needs pyarrow ({INSTALL_HINT})") from error
    return pyarrow


class _ParquetFile:
    """One Parquet file: row -> row dict, reading whole row groups and keeping the last few."""

    def __init__(self, path: str, columns: list[str], cache_row_groups: int) -> None:
        self.path = path
        self.columns = columns
        self.cache_row_groups = cache_row_groups
        pa = _pyarrow(path)
        metadata = pa.parquet.read_metadata(path)
        self.num_rows = metadata.num_rows
        self._group_starts = [0]
        for group in range(metadata.num_row_groups):
            self._group_starts.append(self._group_starts[-1] + metadata.row_group(group).num_rows)
        self._pid: int | None = None
        self._file: Any = None
        self._groups: OrderedDict[int, pa.Table] = OrderedDict()

    def _group(self, group: int) -> pa.Table:
        if self._pid != os.getpid():  # first use in this process (a forked worker starts afresh)
            self._file = _pyarrow(self.path).parquet.ParquetFile(self.path, memory_map=True)
            self._groups.clear()
            self._pid = os.getpid()
        table = self._groups.get(group)
        if table is None:
            table = self._file.read_row_group(group, columns=self.columns)
            self._groups[group] = table
            while len(self._groups) > self.cache_row_groups:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(group)
        return table

    def row(self, row: int) -> dict[str, Any]:
        group = bisect.bisect_right(self._group_starts, row) - 1
        table = self._group(group)
        return table.slice(row - self._group_starts[group], 1).to_pylist()[0]


class _IpcFile:
    """One Arrow IPC file (stream or file format), memory-mapped; rows are zero-copy slices."""

    def __init__(self, path: str, columns: list[str]) -> None:
        self.path = path
        self.columns = columns
        self._pid: int | None = None
        self._table: pa.Table | None = None
        self.num_rows = self._open().num_rows

    def _open(self) -> pa.Table:
        if self._pid != os.getpid() or self._table is None:
            pa = _pyarrow(self.path)
            source = pa.memory_map(self.path, "r")
            head = source.read(len(_ARROW_FILE_MAGIC))
            source.seek(0)
            reader = pa.ipc.open_file(source) if head == _ARROW_FILE_MAGIC else pa.ipc.open_stream(source)
            self._table = reader.read_all().select(self.columns)
            self._pid = os.getpid()
        return self._table

    def row(self, row: int) -> dict[str, Any]:
        return self._open().slice(row, 1).to_pylist()[0]


def _schema_of(path: str) -> pa.Schema:
    pa = _pyarrow(path)
    try:
        if path.endswith(".parquet"):
            return pa.parquet.read_schema(path)
        with pa.memory_map(path, "r") as source:
            head = source.read(len(_ARROW_FILE_MAGIC))
            source.seek(0)
            reader = pa.ipc.open_file(source) if head == _ARROW_FILE_MAGIC else pa.ipc.open_stream(source)
            return reader.schema
    except (pa.ArrowException, OSError) as error:
        raise SourceError(f"{path}: cannot read it as {'Parquet' if path.endswith('.parquet') else 'Arrow'}: "
                          f"{error}") from error


def _image_type_ok(pa: Any, value_type: Any) -> bool:
    """binary / string, or a struct with a binary `bytes` and/or a string `path` field."""
    if pa.types.is_binary(value_type) or pa.types.is_large_binary(value_type) or pa.types.is_string(value_type):
        return True
    if pa.types.is_struct(value_type):
        names = {value_type.field(i).name for i in range(value_type.num_fields)}
        return bool(names & {"bytes", "path"})
    return False


def _is_list(pa: Any, value_type: Any) -> bool:
    return pa.types.is_list(value_type) or pa.types.is_large_list(value_type)


def _one_column(path: str, names: set[str], choices: tuple[str, str]) -> str | None:
    """The one of `choices` (the singular and plural column) the file has, if any."""
    present = [name for name in choices if name in names]
    if len(present) > 1:
        raise SourceError(f"{path}: has both {present[0]!r} and {present[1]!r} columns; keep one")
    return present[0] if present else None


def _video_frames(path: str, schema: pa.Schema, column: str) -> bool:
    """Whether the video column holds frame lists (True) or video files (False); SourceError for any
    other type. `video`: a file value or a list of frame values; `videos`: a list of either."""
    pa = _pyarrow(path)
    value_type = schema.field(column).type
    if column == "videos":
        if not _is_list(pa, value_type):
            raise SourceError(f"{path}: column 'videos' has type {value_type}; expected a list of videos")
        value_type = value_type.value_type
    frames = _is_list(pa, value_type)
    if not _image_type_ok(pa, value_type.value_type if frames else value_type):
        raise SourceError(
            f"{path}: column {column!r} has type {schema.field(column).type}; a video is a file (a {{bytes, "
            f"path}} struct, binary, a string path) or its frames (a list of image values)"
            + ("; 'videos' holds a list of them" if column == "videos" else "")
        )
    return frames


def _columns(path: str, schema: pa.Schema) -> tuple[TableSchema, list[str], str | None, str | None, bool]:
    """(schema kind, columns to read, image column, video column, whether its videos are frame lists)
    of one file; SourceError naming what is wrong."""
    pa = _pyarrow(path)
    names = set(schema.names)
    image = _one_column(path, names, IMAGE_COLUMNS)
    if image is not None:
        value_type = schema.field(image).type
        if _is_list(pa, value_type):
            value_type = value_type.value_type
        if not _image_type_ok(pa, value_type):
            raise SourceError(
                f"{path}: column {image!r} has type {schema.field(image).type}; expected an image struct "
                "{bytes, path}, binary, a string path, or a list of one of these"
            )
    video = _one_column(path, names, VIDEO_COLUMNS)
    frames = video is not None and _video_frames(path, schema, video)
    if "conversations" in names:
        kind: TableSchema = "conversations"
        text = ["conversations"]
    else:
        captions = [name for name in CAPTION_COLUMNS if name in names]
        if not captions or image is None:
            raise SourceError(
                f"{path}: columns {sorted(names)}: need 'conversations' (LLaVA rows) or 'caption'/'text' "
                "with an 'image' column (caption rows)"
            )
        kind, text = "captions", captions[:1]
    optional = [name for name in ("id", "frame_rate") if name in names]
    columns = text + [column for column in (image, video) if column] + optional
    return kind, columns, image, video, frames


class ArrowTableSource:
    """Rows of Parquet or Arrow IPC files, one after another, as records (see the module docstring).

    Args:
        paths: the files, in order; global row i is row i - offset of the file holding it.
        image_root: where path-only images are resolved (`--image-folder`); None refuses them.
        cache_row_groups: Parquet row groups kept per file and process.

    Every file must have the same schema kind and columns (a mixed set is a SourceError naming the
    first file that differs).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        image_root: str | os.PathLike[str] | None = None,
        cache_row_groups: int = DEFAULT_CACHE_ROW_GROUPS,
    ) -> None:
        if not paths:
            raise SourceError("an Arrow table source needs at least one file")
        if cache_row_groups < 1:
            raise ValueError(f"cache_row_groups must be at least 1, got {cache_row_groups}")
        self.paths = [os.fspath(p) for p in paths]
        self.image_root = None if image_root is None else Path(image_root)
        layout = None
        self._files: list[_ParquetFile | _IpcFile] = []
        for path in self.paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--data-path: {path}: no such file")
            found = _columns(path, _schema_of(path))
            if layout is not None and found != layout:
                raise SourceError(
                    f"{path}: columns {found[1]} ({found[0]}) differ from {self.paths[0]}'s {layout[1]} ({layout[0]})"
                )
            layout = found
            if path.endswith(".parquet"):
                self._files.append(_ParquetFile(path, found[1], cache_row_groups))
            else:
                self._files.append(_IpcFile(path, found[1]))
        assert layout is not None
        self.schema, _, self.image_column, self.video_column, self.video_frames = layout
        self._starts = [0]
        for file in self._files:
            self._starts.append(self._starts[-1] + file.num_rows)

    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, row in that file) of global row `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range (0..{len(self) - 1})")
        number = bisect.bisect_right(self._starts, index) - 1
        return number, index - self._starts[number]

    def __getitem__(self, index: int) -> Record:
        number, row = self.locate(index)
        path = self.paths[number]
        values = self._files[number].row(row)
        try:
            return self._parse(values, path, row)
        except _Invalid as error:
            raise BadSample(path, f"row {row}", error.kind, error.reason) from None

    def _parse(self, values: dict[str, Any], path: str, row: int) -> Record:
        names, data = self._images(values.get(self.image_column) if self.image_column else None)
        video_names, video_data = self._videos(values.get(self.video_column) if self.video_column else None)
        llava = self.schema == "conversations"
        turns = self._turns(values["conversations"]) if llava else None
        conversations, kind = _row_conversations(values, turns, len(names), llava, len(video_names))
        return Record(
            source=path,
            index=row,
            sample_id=_sample_id(values, f"{Path(path).name}:{row}"),
            conversations=conversations,
            images=names,
            image_bytes=data,
            kind=kind,
            videos=video_names,
            frame_rate=_frame_rate(values),
            video_bytes=video_data if video_names else None,
        )

    def _videos(self, value: Any) -> tuple[list[str | list[str]], list[bytes | list[bytes]]]:
        """(names, encoded bytes) of a row's video value, nested as Record.videos: a video file each,
        or the frames of each (see the module docstring)."""
        column = self.video_column
        if value is None:
            return [], []
        videos = value if column == "videos" else [value]
        names: list[str | list[str]] = []
        data: list[bytes | list[bytes]] = []
        for number, video in enumerate(videos):
            label = f"{column}[{number}]" if column == "videos" else f"{column}"
            if video is None:
                raise _Invalid("video", f"{label} is null")
            if not self.video_frames:
                name, content = self._media(video, label, "video")
                names.append(name)
                data.append(content)
                continue
            if not video:
                raise _Invalid("video", f"{label} holds no frames")
            frames = [self._media(frame, f"{label}[{index}]", "video") for index, frame in enumerate(video)]
            names.append([name for name, _ in frames])
            data.append([content for _, content in frames])
        return names, data

    @staticmethod
    def _turns(value: Any) -> Any:
        """The conversations value; a string is the JSON of the list."""
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise _Invalid("json", f"malformed 'conversations' JSON: {error}") from error

    def _images(self, value: Any) -> tuple[list[str], list[bytes]]:
        """(names, encoded bytes) of a row's image value (see the module docstring for the forms)."""
        if value is None:
            return [], []
        items = value if isinstance(value, list) else [value]
        names, data = [], []
        for number, item in enumerate(items):
            label = f"{self.image_column}[{number}]"
            if item is None:
                raise _Invalid("image", f"{label} is null")
            name, content = self._media(item, label, "image")
            names.append(name)
            data.append(content)
        return names, data

    def _media(self, item: Any, label: str, what: str) -> tuple[str, bytes]:
        """(name, encoded bytes) of one image or video value: a {bytes, path} struct, binary, or a path."""
        if isinstance(item, dict):
            content, path = item.get("bytes"), item.get("path")
            if content is not None:
                return path or label, content
            if not path:
                raise _Invalid(what, f"{label} has neither bytes nor a path")
            item = path
        if isinstance(item, bytes):
            return label, item
        return item, self._read_file(item, what)

    def _read_file(self, name: str, what: str) -> bytes:
        """The bytes of a path-only image or video, resolved under image_root like a JSON row's paths
        (a missing or escaping path is an "image" bad sample for both, as in the JSON rows)."""
        if self.image_root is None:
            raise _Invalid("image", f"{what} {name!r} is a path and the source has no image_root (--image-folder)")
        try:
            return resolve_image_path(name, self.image_root).read_bytes()
        except ImageError as error:
            raise _Invalid("image", str(error)) from error
        except OSError as error:
            raise _Invalid("image", f"cannot read {what} {name!r}: {error}") from error


def saved_dataset_files(path: str) -> list[str]:
    """The Arrow files of a `datasets.Dataset.save_to_disk` directory, in the order its state.json lists.

    A `DatasetDict` directory (dataset_dict.json, one folder per split) is refused with its splits named,
    since a run trains on one split.
    """
    root = Path(path)
    splits_file = root / "dataset_dict.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text()).get("splits", [])
        raise SourceError(
            f"--data-path {path} is a DatasetDict; name one split directory: "
            + ", ".join(str(root / split) for split in splits)
        )
    state_file = root / "state.json"
    try:
        state = json.loads(state_file.read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise SourceError(f"{state_file}: not a datasets state.json with '_data_files': {error}") from error
    if not names:
        raise SourceError(f"{state_file}: lists no data files")
    return [str(root / name) for name in names]
