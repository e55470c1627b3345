"""Videos in tar shards (megamm.data.tar_shards): video file members and frame-image members read into
records whose native-resolution samples equal those of the equivalent JSON rows; the member naming
rules and bad members, named and counted by kind. (The shards' images, indexing and corruption are
tested in test_sources.py.)"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from megamm.data.loader import PositionDataset, RankLoader
from megamm.data.native_samples import NativeSampleBuilder
from megamm.data.sources import BadSample
from megamm.data.tar_shards import TarShardSource, video_parts
from tests.data.test_native_samples import (
    FRAMES,
    SETTINGS,
    VIDEO_ROWS,
    assert_same_sample,
    json_rows,
    qwen_tokenizer,
    write_video_files,
)

av = pytest.importorskip("av")


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for suffix, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def video_members(root: Path, row: dict) -> dict[str, bytes]:
    """A JSON row of VIDEO_ROWS as tar members: the row (its paths left out) and its files."""
    videos = [row["video"]] if "video" in row else row.get("videos", [])
    meta = {k: v for k, v in row.items() if k not in ("image", "images", "video", "videos")}
    parts = {"json": json.dumps(meta).encode()}
    for number, image in enumerate(row.get("images", [])):
        parts[f"{number}.png"] = (root / image).read_bytes()
    for number, video in enumerate(videos):
        prefix = f"{number}." if len(videos) > 1 else ""
        if isinstance(video, str):
            parts[f"{prefix}mp4"] = (root / video).read_bytes()
        else:
            parts.update({f"{prefix}frames.{f}.png": (root / frame).read_bytes() for f, frame in enumerate(video)})
    return parts


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video_files(tmp_path_factory.mktemp("tar_videos"))


def test_videos_in_shards_build_the_json_rows_samples(root: Path) -> None:
    """A frame-list video (`<key>.frames.<f>.png`), a video file (`<key>.mp4`) and both numbered
    (`<key>.0.mp4`, `<key>.1.frames.<f>.png`): the records hold the members, the samples equal the
    JSON rows' and the probe gives the built counts from the members' headers."""
    shard = write_tar(root / "videos.tar", [(f"k{i}", video_members(root, row)) for i, row in enumerate(VIDEO_ROWS)])
    tar, rows = TarShardSource([shard]), json_rows(root, VIDEO_ROWS)
    assert tar[0].videos == [[f"k0.frames.{f}.png" for f in range(12)]] and tar[0].frame_rate == 4.0
    assert tar[1].videos == ["k1.mp4"] and tar[1].video_bytes == [(root / "clip.mp4").read_bytes()]
    assert tar[2].videos[0] == "k2.0.mp4" and len(tar[2].video_bytes[1]) == 12
    builder = NativeSampleBuilder(qwen_tokenizer(root), "qwen2_vl", SETTINGS, 512)
    for index in range(len(VIDEO_ROWS)):
        sample = builder.build(tar[index])
        assert_same_sample(sample, builder.build(rows[index]))
        assert builder.probe(tar[index]) == builder.probe(rows[index])
        assert builder.probe(tar[index]).grids[-1] == tuple(sample.native.video_grid_thw[-1].tolist())


def test_video_member_names() -> None:
    """The naming rules: one video or several numbered ones, file or frames; the refusals."""
    def parts(*suffixes: str) -> dict[str, str]:
        return {suffix: f"k.{suffix}" for suffix in suffixes}

    frames = [f"frames.{f}.jpg" for f in range(11)]
    assert video_parts(parts("json", "jpg", "mp4")) == ["mp4"]
    assert video_parts(parts("json", *reversed(frames))) == [frames]  # 10 after 9: numeric order
    assert video_parts(parts("1.webm", "0.frames.1.png", "0.frames.0.png", "0.jpg")) == [
        ["0.frames.0.png", "0.frames.1.png"], "1.webm"]
    assert video_parts(parts("json", "0.jpg", "txt", "x.mp4")) == []
    refused = {
        ("mp4", "0.mp4"): "mixes <key>.<ext> and <key>.<n>.<ext> video members",
        ("0.mp4", "2.mp4"): r"video numbers must be 0..n-1, got \[0, 2\]",
        ("mp4", "frames.0.jpg"): r"the video is both a file \(k.mp4\) and frames",
        ("0.mp4", "0.mkv"): "two members for video 0: k.0.m",
        ("frames.0.jpg", "frames.2.jpg"): r"frame numbers of the video must be 0..f-1, got \[0, 2\]",
        ("frames.0.jpg", "frames.0.png"): "two members for frame 0 of the video",
    }
    for suffixes, message in refused.items():
        with pytest.raises(ValueError, match=message):
            video_parts(parts(*suffixes))


def test_bad_video_samples_are_named_and_counted(root: Path) -> None:
    """Bad video members fail the sample, not the shard: counted by kind, the rest read."""
    good = video_members(root, VIDEO_ROWS[1])
    meta = {k: v for k, v in json.loads(good["json"]).items() if k != "id"}  # each sample's id is its key
    good["json"] = json.dumps(meta).encode()
    samples = [
        ("good", good),
        ("mixed", {**good, "0.mp4": good["mp4"]}),  # member
        ("gap", {"json": good["json"], "frames.0.png": (root / FRAMES[0]).read_bytes(),
                 "frames.2.png": (root / FRAMES[1]).read_bytes()}),  # member
        ("two", {**good, "json": json.dumps({**meta, "conversations": VIDEO_ROWS[2]["conversations"]}).encode()}),
        ("broken", {**good, "mp4": b"not a video"}),  # video (found when built)
        ("caption", {"json": json.dumps({"caption": "A cat."}).encode(), "png": (root / "image0.png").read_bytes(),
                     "mp4": good["mp4"]}),  # schema
        ("rate", {**good, "json": json.dumps({**meta, "frame_rate": -1}).encode()}),  # schema
    ]
    tar = TarShardSource([write_tar(root / "bad.tar", samples)])
    kinds = {}
    builder = NativeSampleBuilder(qwen_tokenizer(root), "qwen2_vl", SETTINGS, 512)
    for index, (key, _) in enumerate(samples):
        try:
            builder.build(tar[index])
        except BadSample as error:
            assert f"key {key!r}" in str(error) or f"id {key!r}" in str(error), str(error)
            kinds[key] = error.kind
    assert kinds == {"mixed": "member", "gap": "member", "two": "placeholders", "broken": "video",
                     "caption": "schema", "rate": "schema"}
    # The loader skips and counts them: one epoch meets each bad record at least once.
    loader = RankLoader(PositionDataset(tar, builder, seed=0), 7, 0, 1, 0, 1, min_records_for_check=1000)
    assert [sample.sample_id for sample in next(loader)] == ["good"] * 7
    assert loader.stats.records - loader.stats.bad == 7
    for kind in set(kinds.values()):
        assert loader.stats.reasons[kind] >= list(kinds.values()).count(kind), loader.stats.reasons
