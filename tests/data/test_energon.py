"""Megatron-Energon datasets as record sources. The datasets are prepared by Energon's own `energon
prepare` (non-interactively) from tar shards written here: captioning, VQA and crude (multi-turn LLaVA
rows) sample types read back as written, bad samples named and counted, the loader's dp sharding and
resume over them, blending with a JSON source."""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from megamm.data.datasets import build_source, open_source
from megamm.data.energon import EnergonSource
from megamm.data.loader import PositionDataset, RankLoader
from megamm.data.samples import ImageSettings, SampleBuilder
from megamm.data.sources import BadSample, BlendedSource, SourceError
from megamm.data.tokenizer import load_tokenizer
from tests.data_fixtures import DatasetFiles, write_dataset

pytest.importorskip("megatron.energon")
from click.testing import CliRunner  # energon's CLI is a click command
from megatron.energon.cli.main import main as energon_cli

TWO_IMAGES = [{"from": "human", "value": "<image> then <image>: which colors?"}, {"from": "gpt", "value": "two"},
              {"from": "human", "value": "And first?"}, {"from": "gpt", "value": "the first"}]


def _write_shards(root: Path, samples: list[tuple[str, dict[str, bytes]]], per_shard: int) -> None:
    """`(key, {suffix: bytes})` samples into uncompressed tar shards of `per_shard` samples."""
    root.mkdir(parents=True)
    for start in range(0, len(samples), per_shard):
        with tarfile.open(root / f"part-{start // per_shard:03d}.tar", "w") as tar:
            for key, parts in samples[start:start + per_shard]:
                for suffix, data in parts.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def _prepare(root: Path, sample_type: str, field_map: dict[str, str] | None = None) -> Path:
    args = ["prepare", str(root), "--non-interactive", "--split-ratio", "1,0,0", "--num-workers", "1",
            "--no-progress", "--sample-type", sample_type]
    if field_map is not None:
        args += ["--field-map", json.dumps(field_map)]
    result = CliRunner().invoke(energon_cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (root / ".nv-meta" / "dataset.yaml").is_file()
    return root


def _rows(files: DatasetFiles) -> list[dict]:
    return [json.loads(line) for line in files.train.read_text().splitlines()]


def _crude_samples(files: DatasetFiles) -> list[tuple[str, dict[str, bytes]]]:
    """The fixture's LLaVA rows as crude samples (`json` + `png`), plus one multi-turn two-image row."""
    samples = []
    for row in _rows(files):
        parts = {"json": json.dumps(row).encode()}
        if "image" in row:
            parts["png"] = (files.images / row["image"]).read_bytes()
        samples.append((row["id"], parts))
    two = {"json": json.dumps({"id": "two", "conversations": TWO_IMAGES}).encode(),
           "0.png": (files.images / "img0.png").read_bytes(), "1.png": (files.images / "img1.png").read_bytes()}
    return samples + [("two", two)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> DatasetFiles:
    return write_dataset(tmp_path_factory.mktemp("energon"), rows=24)


@pytest.fixture(scope="module")
def crude(files: DatasetFiles) -> Path:
    root = files.root / "crude"
    _write_shards(root, _crude_samples(files), per_shard=7)
    return _prepare(root, "CrudeWebdataset")


def _builder(files: DatasetFiles) -> SampleBuilder:
    return SampleBuilder(load_tokenizer(files.tokenizer), "llava_v1", ImageSettings(16), 16, 512)


def test_crude_conversations_read_back_as_written(files: DatasetFiles, crude: Path) -> None:
    source = open_source(str(crude), None)
    assert isinstance(source, EnergonSource) and len(source) == 25
    written = _crude_samples(files)
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(1)).tolist()
    for index in order:
        record = source[index]
        key, parts = written[index]
        assert record.sample_id == key and record.source == str(crude / f"part-{index // 7:03d}.tar")
        assert record.image_bytes == [parts[s] for s in ("png", "0.png", "1.png") if s in parts]
    assert source[24].conversations == TWO_IMAGES and source[24].images == ["two.0.png", "two.1.png"]
    # The samples equal those built from the JSONL file and its image folder.
    json_source, builder = open_source(str(files.train), str(files.images)), _builder(files)
    for index in range(24):
        ours, theirs = builder.build(source[index]), builder.build(json_source[index])
        assert ours.input_ids == theirs.input_ids and torch.equal(ours.pixel_values, theirs.pixel_values)


def test_captioning_and_vqa_samples(files: DatasetFiles) -> None:
    rows = [row for row in _rows(files) if "image" in row]
    images = {row["id"]: (files.images / row["image"]).read_bytes() for row in rows}
    captions = [(row["id"], {"png": images[row["id"]], "txt": f"caption {row['id']}".encode()}) for row in rows]
    _write_shards(files.root / "captions", captions, per_shard=8)
    source = open_source(str(_prepare(files.root / "captions", "CaptioningSample",
                                      {"image": "png", "caption": "txt"})), None)
    assert len(source) == len(rows)
    for index, (key, parts) in enumerate(captions):
        record = source[index]
        assert (record.kind, record.sample_id, record.image_bytes) == ("caption", key, [parts["png"]])
        assert record.conversations == [{"from": "human", "value": "<image>"},
                                        {"from": "gpt", "value": f"caption {key}"}]
    questions = [(row["id"], {"png": images[row["id"]], "json": json.dumps(
        {"q": f"Color of {row['id']}?", "a": ["red", "blue"], "w": [0.25, 0.75]}).encode()}) for row in rows[:4]]
    _write_shards(files.root / "vqa", questions, per_shard=8)
    vqa = _prepare(files.root / "vqa", "VQASample",
                   {"image": "png", "context": "json[q]", "answers": "json[a]", "answer_weights": "json[w]"})
    source = open_source(str(vqa), None)
    record = source[2]
    assert record.sample_id == questions[2][0] and record.image_bytes == [questions[2][1]["png"]]
    # The placeholder goes before the question; the answer of largest weight is trained.
    assert record.conversations == [{"from": "human", "value": f"<image>\nColor of {questions[2][0]}?"},
                                    {"from": "gpt", "value": "blue"}]
    # A sample type megamm does not read is refused when opened, naming the type.
    text = files.root / "text"
    shutil.copytree(vqa, text)
    (text / ".nv-meta" / "dataset.yaml").write_text(
        "sample_type:\n  __module__: megatron.energon\n  __class__: TextSample\nfield_map:\n  text: json[q]\n")
    with pytest.raises(SourceError, match="sample type TextSample is not read by megamm"):
        open_source(str(text), None)


def test_bad_samples_are_named_and_counted_by_kind(files: DatasetFiles) -> None:
    png = (files.images / "img0.png").read_bytes()
    ask = [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}]
    samples = [
        ("good", {"json": json.dumps({"conversations": ask}).encode(), "png": png}),
        ("two", {"json": json.dumps({"conversations": TWO_IMAGES}).encode(), "png": png}),  # placeholders
        ("noturns", {"json": json.dumps({"conversations": []}).encode(), "png": png}),    # schema
        ("gap", {"json": json.dumps({"conversations": ask}).encode(), "1.png": png}),    # member
        ("nojson", {"png": png, "txt": b"hello"}),                                       # member
        # json (in the second shard: `energon prepare` parses the first samples' json parts itself)
        ("broken", {"json": b'{"conversations": [', "png": png}),
        ("cut", {"json": json.dumps({"conversations": ask}).encode(), "png": png[:40]}),  # image, when decoded
    ]
    _write_shards(files.root / "bad", samples, per_shard=4)
    source, builder = open_source(str(_prepare(files.root / "bad", "CrudeWebdataset")), None), _builder(files)
    found: dict[str, list[str]] = {}
    for index in range(len(source)):
        try:
            builder.build(source[index])
        except BadSample as error:
            found.setdefault(error.kind, []).append(str(error))
    assert {kind: len(messages) for kind, messages in found.items()} == {
        "json": 1, "placeholders": 1, "schema": 1, "member": 2, "image": 1}
    shard1 = files.root / "bad" / "part-001.tar"
    assert found["json"][0].startswith(f"{shard1}: key 'broken': malformed json part: ")
    assert f"{shard1}: key 'nojson': no nojson.json part" in found["member"]
    assert any("gap" in m and "image numbers must be 0..n-1" in m for m in found["member"])


def test_loader_covers_an_epoch_once_at_dp2_and_resumes(files: DatasetFiles, crude: Path) -> None:
    source = open_source(str(crude), None)
    dataset = PositionDataset(source, _builder(files), seed=7)
    n = len(source)  # 25: the epoch spans iterations of 10 unevenly, so take 5 iterations of 5
    read = [[s.sample_id for step in RankLoader(dataset, 10, rank, 2, 0, 5) for s in step] for rank in (0, 1)]
    first_epoch = [i for step in range(5) for rank in (0, 1) for i in read[rank][step * 5:(step + 1) * 5]][:n]
    assert sorted(first_epoch) == sorted(key for key, _ in _crude_samples(files))
    full = list(RankLoader(dataset, 6, 0, 2, 0, 6, num_workers=2))
    resumed = list(RankLoader(dataset, 6, 0, 2, 3, 6, num_workers=2))
    assert [[s.sample_id for s in step] for step in resumed] == [[s.sample_id for s in step] for step in full[3:]]
    for ours, theirs in zip(resumed[-1], full[-1]):
        assert ours.input_ids == theirs.input_ids and torch.equal(ours.pixel_values, theirs.pixel_values)


def test_blends_with_a_json_source(files: DatasetFiles, crude: Path) -> None:
    blended, parts = build_source(["3", str(files.train), "1", str(crude)], str(files.images), 0, 40)
    assert isinstance(blended, BlendedSource) and len(parts) == 2
    sources = [blended[i].source for i in range(40)]
    assert sum(s == str(files.train) for s in sources) == 30
    assert sum(s.startswith(str(crude)) for s in sources) == 10


def test_missing_energon_names_the_path_and_the_extra(crude: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "megatron.energon", None)
    with pytest.raises(ImportError, match=r"crude: reading an Energon dataset needs .*megamm\[energon\]"):
        open_source(str(crude), None)


def test_videos_vidqa_and_crude_samples(tmp_path: Path) -> None:
    """Energon's video QA type (its video part kept encoded) and crude samples with video parts
    (`<key>.mp4`, frame images): the native-resolution samples of the equivalent JSON rows."""
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
    from tests.data.test_tar_shards import video_members

    root = tmp_path / "files"
    root.mkdir()
    write_video_files(root)
    rows, clip = json_rows(root, VIDEO_ROWS), (root / "clip.mp4").read_bytes()
    builder = NativeSampleBuilder(qwen_tokenizer(root), "qwen2_vl", SETTINGS, 512)
    crude_root = tmp_path / "crude"
    _write_shards(crude_root, [(f"k{i}", video_members(root, row)) for i, row in enumerate(VIDEO_ROWS)], per_shard=2)
    crude = open_source(str(_prepare(crude_root, "CrudeWebdataset")), None)
    assert crude[0].videos == [[f"k0.frames.{f}.png" for f in range(12)]] and crude[1].video_bytes == [clip]
    for index in range(len(VIDEO_ROWS)):
        assert_same_sample(builder.build(crude[index]), builder.build(rows[index]))
    question = VIDEO_ROWS[1]["conversations"]
    vidqa_root = tmp_path / "vidqa"
    _write_shards(vidqa_root, [("file", {"mp4": clip, "json": json.dumps(
        {"q": question[0]["value"].replace("<video>", ""), "a": [question[1]["value"]]}).encode()})], per_shard=1)
    vidqa = open_source(str(_prepare(vidqa_root, "VidQASample", {"video": "mp4", "context": "json[q]",
                                                                  "answers": "json[a]"})), None)
    record = vidqa[0]
    assert record.videos == ["file video"] and record.video_bytes == [clip] and record.images == []
    # No "<video>" in the context: it goes before the question, as the JSON row has it.
    assert record.conversations[0]["value"] == "<video>\n" + question[0]["value"].replace("<video>", "")
    reference = json_rows(root, [{**VIDEO_ROWS[1], "conversations": record.conversations}])[0]
    assert_same_sample(builder.build(record), builder.build(reference))
