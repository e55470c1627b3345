"""Parquet files and `save_to_disk` directories as record sources: rows read back as written, the
accepted schemas, bad rows named and counted, the loader's dp sharding and resume over them, blending
with a JSON source."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from megamm.data.arrow_tables import ArrowTableSource
from megamm.data.datasets import build_source, open_source
from megamm.data.loader import PositionDataset, RankLoader
from megamm.data.samples import ImageSettings, SampleBuilder
from megamm.data.sources import BadSample, BlendedSource, SourceError
from megamm.data.tokenizer import load_tokenizer
from tests.data_fixtures import DatasetFiles, write_dataset

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TURN_TYPE = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> DatasetFiles:
    return write_dataset(tmp_path_factory.mktemp("parquet"), rows=24)


def _rows(files: DatasetFiles) -> list[dict]:
    """The JSONL rows with each image as a Hugging Face Image struct holding the file's bytes."""
    rows = []
    for line in files.train.read_text().splitlines():
        row = json.loads(line)
        name = row.pop("image", None)
        row["image"] = None if name is None else {"bytes": (files.images / name).read_bytes(), "path": name}
        rows.append(row)
    return rows


def _write(path: Path, rows: list[dict], row_group_size: int = 4) -> Path:
    schema = pa.schema([("id", pa.string()), ("image", IMAGE_TYPE), ("conversations", TURN_TYPE)])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


def _png(color: tuple[int, int, int] = (200, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, "PNG")
    return buffer.getvalue()


def _builder(files: DatasetFiles) -> SampleBuilder:
    return SampleBuilder(load_tokenizer(files.tokenizer), "plain", ImageSettings(16), 16, 64)


def test_random_access_equals_the_rows_written(files: DatasetFiles, tmp_path: Path) -> None:
    rows = _rows(files)
    first = _write(tmp_path / "a.parquet", rows[:10])
    second = _write(tmp_path / "b.parquet", rows[10:])
    source = ArrowTableSource([first, second], files.images)
    assert len(source) == len(rows)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    for index in order:
        record, row = source[index], rows[index]
        assert record.sample_id == row["id"]
        assert (record.source, record.index) == ((str(first), index) if index < 10 else (str(second), index - 10))
        expected_bytes = [] if row["image"] is None else [row["image"]["bytes"]]
        assert record.image_bytes == expected_bytes
        assert record.kind == ("text" if row["image"] is None else "conversation")
        assert [turn["from"] for turn in record.conversations] == [turn["from"] for turn in row["conversations"]]
        assert record.conversations[-1] == row["conversations"][-1]
        # Row groups are read lazily and only the last two are kept.
        assert all(len(f._groups) <= 2 for f in source._files)
    # The samples equal those built from the JSONL file and its image folder.
    json_source, builder = open_source(str(files.train), str(files.images)), _builder(files)
    for index in range(len(rows)):
        ours, theirs = builder.build(source[index]), builder.build(json_source[index])
        assert ours.input_ids == theirs.input_ids and ours.labels == theirs.labels
        assert torch.equal(ours.pixel_values, theirs.pixel_values)


def test_accepted_schemas(files: DatasetFiles, tmp_path: Path) -> None:
    png, other = _png(), _png((0, 0, 200))
    two = [{"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "red, blue"}]
    # A list of Image structs in an `images` column, and conversations stored as a JSON string.
    table = pa.table({
        "images": pa.array([[{"bytes": png, "path": None}, {"bytes": other, "path": "b.png"}]],
                           pa.list_(IMAGE_TYPE)),
        "conversations": [json.dumps(two)],
    })
    pq.write_table(table, tmp_path / "lists.parquet")
    record = open_source(str(tmp_path / "lists.parquet"), None)[0]
    assert record.image_bytes == [png, other] and record.images == ["images[0]", "b.png"]
    assert record.conversations == two and record.sample_id == "lists.parquet:0"
    # Raw binary images; caption rows (human "<image>", gpt caption).
    pq.write_table(pa.table({"image": pa.array([png], pa.binary()), "caption": ["a red square"], "id": [7]}),
                   tmp_path / "captions.parquet")
    record = open_source(str(tmp_path / "captions.parquet"), None)[0]
    assert record.kind == "caption" and record.sample_id == "7" and record.image_bytes == [png]
    assert record.conversations == [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red square"}]
    # String paths and path-only structs resolve under --image-folder, as JSON rows' paths do.
    one = [{"from": "human", "value": "Color?"}, {"from": "gpt", "value": "red"}]
    pq.write_table(pa.table({"image": ["img0.png"], "conversations": pa.array([one], TURN_TYPE)}),
                   tmp_path / "paths.parquet")
    record = open_source(str(tmp_path / "paths.parquet"), str(files.images))[0]
    assert record.image_bytes == [(files.images / "img0.png").read_bytes()]
    assert record.conversations[0]["value"] == "<image>\nColor?"  # the implicit placeholder
    with pytest.raises(BadSample, match="is a path and the source has no image_root"):
        open_source(str(tmp_path / "paths.parquet"), None)[0]
    path_only = pa.array([{"bytes": None, "path": str(files.images / "img1.png")}], IMAGE_TYPE)
    pq.write_table(pa.table({"image": path_only, "conversations": pa.array([one], TURN_TYPE)}),
                   tmp_path / "path_only.parquet")
    record = open_source(str(tmp_path / "path_only.parquet"), str(files.images))[0]
    assert record.image_bytes == [(files.images / "img1.png").read_bytes()]
    # Ambiguous or unusable tables are refused when opened, naming the file.
    for name, columns, message in (
        ("both.parquet", {"image": [png], "images": [[png]], "conversations": [json.dumps(one)]}, "both"),
        ("neither.parquet", {"question": ["q"]}, "need 'conversations'"),
        ("ints.parquet", {"image": [3], "conversations": [json.dumps(one)]}, "column 'image' has type int64"),
    ):
        pq.write_table(pa.table(columns), tmp_path / name)
        with pytest.raises(SourceError, match=message) as raised:
            open_source(str(tmp_path / name), None)
        assert name in str(raised.value)


def test_bad_rows_are_named_and_counted_by_kind(files: DatasetFiles, tmp_path: Path) -> None:
    good, ask = _png(), [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}]
    bad_rows = [
        ("nothing", {"bytes": None, "path": None}, ask, "image"),       # neither bytes nor a path
        ("escape", {"bytes": None, "path": "../outside.png"}, ask, "image"),
        ("missing", {"bytes": None, "path": "nope.png"}, ask, "image"),
        ("undecodable", {"bytes": good[:30], "path": None}, ask, "image"),  # caught when decoded
        ("two", {"bytes": good, "path": None},
         [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "red"}], "placeholders"),
        ("no-value", {"bytes": good, "path": None}, [{"from": "human", "value": None}], "schema"),
    ]
    rows = [{"id": "ok", "image": {"bytes": good, "path": None}, "conversations": ask}]
    rows += [{"id": name, "image": image, "conversations": turns} for name, image, turns, _ in bad_rows]
    path = _write(tmp_path / "bad.parquet", rows, row_group_size=3)
    source, builder = open_source(str(path), str(files.images)), _builder(files)
    found: dict[str, int] = {}
    for index in range(len(source)):
        try:
            builder.build(source[index])
        except BadSample as error:
            found[error.kind] = found.get(error.kind, 0) + 1
            assert str(path) in str(error)
            assert f"row {index}" in str(error) or f"sample {index}" in str(error), str(error)
    assert found == {"image": 4, "placeholders": 1, "schema": 1}
    # A malformed conversations string is a json bad sample.
    pq.write_table(pa.table({"conversations": ["[{"]}), tmp_path / "json.parquet")
    with pytest.raises(BadSample, match=r"json\.parquet: row 0: malformed 'conversations' JSON") as raised:
        open_source(str(tmp_path / "json.parquet"), None)[0]
    assert raised.value.kind == "json"


def test_loader_covers_an_epoch_once_at_dp2_and_resumes(files: DatasetFiles, tmp_path: Path) -> None:
    rows = _rows(files)
    _write(tmp_path / "part-0.parquet", rows[:12])
    _write(tmp_path / "part-1.parquet", rows[12:])
    source = open_source(str(tmp_path), None)  # a directory of Parquet files
    assert len(source) == 24
    dataset = PositionDataset(source, _builder(files), seed=5)
    read = [[s.sample_id for step in RankLoader(dataset, 8, rank, 2, 0, 3) for s in step] for rank in (0, 1)]
    ids = read[0] + read[1]
    assert sorted(ids) == sorted(row["id"] for row in rows)  # each record once over the epoch
    full = list(RankLoader(dataset, 6, 1, 2, 0, 7, num_workers=1))
    resumed = list(RankLoader(dataset, 6, 1, 2, 4, 7, num_workers=1))
    assert [[s.sample_id for s in step] for step in resumed] == [[s.sample_id for s in step] for step in full[4:]]
    for ours, theirs in zip(resumed[-1], full[-1]):
        assert ours.input_ids == theirs.input_ids and torch.equal(ours.pixel_values, theirs.pixel_values)


def test_blends_with_a_json_source_and_globs(files: DatasetFiles, tmp_path: Path) -> None:
    rows = _rows(files)
    _write(tmp_path / "train-0.parquet", rows[:12])
    _write(tmp_path / "train-1.parquet", rows[12:])
    pattern = str(tmp_path / "train-*.parquet")
    blended, parts = build_source(["1", str(files.train), "3", pattern], str(files.images), 0, 40)
    assert isinstance(blended, BlendedSource) and len(parts) == 2
    sources = [blended[i].source for i in range(40)]
    assert sum(s.endswith(".parquet") for s in sources) == 30
    assert sum(s == str(files.train) for s in sources) == 10
    (tmp_path / "shard.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="only .tar or only .parquet"):
        open_source(str(tmp_path), None)


def test_save_to_disk_directory(files: DatasetFiles, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [row for row in _rows(files) if row["image"] is not None][:8]
    features = datasets.Features({
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
    })
    dataset = datasets.Dataset.from_list(rows, features=features)
    dataset.save_to_disk(str(tmp_path / "saved"), num_shards=3)  # three Arrow stream files
    assert len(list((tmp_path / "saved").glob("*.arrow"))) == 3
    source = open_source(str(tmp_path / "saved"), None)
    assert [source[i].sample_id for i in range(len(source))] == [row["id"] for row in rows]
    assert [source[i].image_bytes for i in range(len(source))] == [[row["image"]["bytes"]] for row in rows]
    assert source[0].images == [rows[0]["image"]["path"]]
    datasets.DatasetDict({"train": dataset, "validation": dataset}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(SourceError, match=r"DatasetDict; name one split directory: .*splits/train"):
        open_source(str(tmp_path / "splits"), None)


def test_missing_pyarrow_names_the_path_and_the_extra(
    files: DatasetFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "rows.parquet", _rows(files)[:2])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"rows\.parquet: reading Parquet/Arrow data needs pyarrow .*megamm\[parquet\]"):
        open_source(str(path), None)


# --- Videos (the native-resolution family): a `videos` column of frame lists, a `video` column of files.


def _video_tables(root: Path) -> tuple[Path, Path]:
    """VIDEO_ROWS' twins: `frames.parquet` with `images` (binary list) and `videos` (frame lists) and a
    `frame_rate` column; `files.arrow` (Arrow IPC) with one `video` file a row, as bytes or a path."""
    from tests.data.test_native_samples import VIDEO_ROWS

    def read(name: str) -> bytes:
        return (root / name).read_bytes()

    full, one_file = VIDEO_ROWS[0], VIDEO_ROWS[1]
    frames = pa.Table.from_pylist(
        [{"id": full["id"], "images": [read(name) for name in full["images"]],
          "videos": [[read(frame) for frame in full["videos"][0]]], "frame_rate": 4.0,
          "conversations": full["conversations"]},
         {"id": "text", "images": None, "videos": None, "frame_rate": None,
          "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes."}]}],
        schema=pa.schema([("id", pa.string()), ("images", pa.list_(pa.binary())),
                          ("videos", pa.list_(pa.list_(pa.binary()))), ("frame_rate", pa.float64()),
                          ("conversations", TURN_TYPE)]))
    pq.write_table(frames, root / "frames.parquet")
    files = pa.Table.from_pylist(
        [{"id": one_file["id"], "video": {"bytes": read("clip.mp4"), "path": "clip.mp4"},
          "conversations": one_file["conversations"]},
         {"id": one_file["id"], "video": {"bytes": None, "path": "clip.mp4"}, "conversations": one_file["conversations"]}],
        schema=pa.schema([("id", pa.string()), ("video", IMAGE_TYPE), ("conversations", TURN_TYPE)]))
    with pa.ipc.new_file(str(root / "files.arrow"), files.schema) as writer:
        writer.write_table(files)
    return root / "frames.parquet", root / "files.arrow"


def test_videos_in_tables_build_the_json_rows_samples(tmp_path: Path) -> None:
    """Frame lists and video files (bytes, or a path under --image-folder) in table cells: the samples
    equal the JSON rows' and the probe gives their counts; bad video cells and columns named."""
    pytest.importorskip("av")
    from megamm.data.native_samples import NativeSampleBuilder
    from tests.data.test_native_samples import (
        SETTINGS,
        VIDEO_ROWS,
        assert_same_sample,
        json_rows,
        qwen_tokenizer,
        write_video_files,
    )

    root = write_video_files(tmp_path)
    frames_path, files_path = _video_tables(root)
    frames, files = open_source(str(frames_path), str(root)), ArrowTableSource([files_path], root)
    assert frames.video_frames and not files.video_frames
    rows = json_rows(root, VIDEO_ROWS)
    builder = NativeSampleBuilder(qwen_tokenizer(root), "qwen2_vl", SETTINGS, 512)
    assert frames[0].videos == [[f"videos[0][{f}]" for f in range(12)]] and frames[0].frame_rate == 4.0
    assert frames[1].videos == [] and frames[1].kind == "text" and frames[1].frame_rate == 2.0
    for table, index, twin in ((frames, 0, 0), (files, 0, 1), (files, 1, 1)):
        assert_same_sample(builder.build(table[index]), builder.build(rows[twin]))
        assert builder.probe(table[index]) == builder.probe(rows[twin])
    # Bad cells are bad samples of their row; a column of another type refuses the file.
    clip = (root / "clip.mp4").read_bytes()
    turns = VIDEO_ROWS[1]["conversations"]
    bad = pa.Table.from_pylist(
        [{"videos": [None], "conversations": turns}, {"videos": [[]], "conversations": turns},
         {"videos": [[clip]], "conversations": [{"from": "human", "value": "<video><video>"}, {"from": "gpt", "value": "A"}]}],
        schema=pa.schema([("videos", pa.list_(pa.list_(pa.binary()))), ("conversations", TURN_TYPE)]))
    pq.write_table(bad, tmp_path / "bad.parquet")
    source = open_source(str(tmp_path / "bad.parquet"), None)
    for row, (kind, message) in enumerate([("video", "videos[0] is null"), ("video", "videos[0] holds no frames"),
                                           ("placeholders", "2 '<video>' placeholder(s) in the turns but 1 video")]):
        with pytest.raises(BadSample, match=rf"bad\.parquet: row {row}: {re.escape(message)}") as raised:
            source[row]
        assert raised.value.kind == kind
    pq.write_table(pa.table({"video": [1], "conversations": [json.dumps(turns)]}), tmp_path / "int.parquet")
    with pytest.raises(SourceError, match="column 'video' has type int64; a video is a file"):
        open_source(str(tmp_path / "int.parquet"), None)
    pq.write_table(pa.table({"video": [clip], "videos": [[clip]], "conversations": [json.dumps(turns)]}),
                   tmp_path / "both.parquet")
    with pytest.raises(SourceError, match="has both 'video' and 'videos' columns"):
        open_source(str(tmp_path / "both.parquet"), None)
