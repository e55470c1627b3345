"""Tests for megamm.data.sources, on small JSON/JSONL files, PNGs and tar shards written to tmp_path."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from megamm.data.sources import (
    BadSample,
    BlendedSource,
    CaptionSource,
    LlavaJsonSource,
    Record,
    SkippingReader,
    SourceError,
)
from megamm.data.tar_shards import TarShardSource


def _png(color: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png"):
        (images / name).write_bytes(_png())
    (tmp_path / "outside.png").write_bytes(_png())
    return images


def _turns(*values: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


ROWS: list[dict[str, Any]] = [
    {"id": "one", "image": "a.png", "conversations": _turns("<image>\nWhat is it?", "Red.")},
    {"id": 7, "conversations": _turns("Hello", "Hi.")},
    {"id": "two", "images": ["a.png", "sub/c.png"], "conversations": _turns("<image> vs <image>?", "Same.")},
    {"id": "implicit", "image": "b.png", "conversations": _turns("Describe.", "A square.")},
]


def _write_json(path: Path, rows: list[Any]) -> Path:
    path.write_text(json.dumps(rows))
    return path


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_json_and_jsonl_give_equal_records(tmp_path: Path, root: Path) -> None:
    a = LlavaJsonSource(_write_json(tmp_path / "d.json", ROWS), root)
    b = LlavaJsonSource(_write_jsonl(tmp_path / "d.jsonl", ROWS), root)
    assert len(a) == len(b) == 4
    for i in range(4):
        ra, rb = a[i], b[i]
        assert (ra.sample_id, ra.conversations, ra.images, ra.kind) == (
            rb.sample_id,
            rb.conversations,
            rb.images,
            rb.kind,
        )
        assert ra.index == i and ra.source.endswith("d.json") and rb.source.endswith("d.jsonl")


def test_row_kinds_and_placeholders(tmp_path: Path, root: Path) -> None:
    src = LlavaJsonSource(_write_jsonl(tmp_path / "d.jsonl", ROWS), root)
    single, text, multi, implicit = (src[i] for i in range(4))
    assert single.kind == "conversation" and single.images == [str((root / "a.png").resolve())]
    assert single.image_bytes is None
    assert text.kind == "text" and text.images == [] and text.sample_id == "7"
    assert multi.images == [str((root / "a.png").resolve()), str((root / "sub/c.png").resolve())]
    assert multi.conversations[0]["value"] == "<image> vs <image>?"
    assert implicit.conversations[0]["value"] == "<image>\nDescribe."
    assert implicit.conversations[1]["value"] == "A square."
    # The input row is not mutated by the implicit insertion.
    assert ROWS[3]["conversations"][0]["value"] == "Describe."


def test_missing_id_gets_file_and_row(tmp_path: Path, root: Path) -> None:
    src = LlavaJsonSource(_write_jsonl(tmp_path / "d.jsonl", [{"conversations": _turns("hi")}]), root)
    assert src[0].sample_id == "d.jsonl:0"


BAD_ROWS: dict[str, tuple[Any, str]] = {
    "malformed_json": ('{"id": 1, "conversations": [', "malformed JSON"),
    "missing_conversations": ({"id": 1, "image": "a.png"}, "'conversations' must be a non-empty list"),
    "empty_conversations": ({"conversations": []}, "non-empty list"),
    "turn_not_object": ({"conversations": ["hello"]}, "turn 0 is a str"),
    "value_not_string": ({"conversations": [{"from": "human", "value": 3}]}, "string 'from' and 'value'"),
    "image_not_string": ({"image": 5, "conversations": _turns("<image>")}, "image field"),
    "row_not_object": ([1, 2], "not an object"),
    "too_many_placeholders": ({"image": "a.png", "conversations": _turns("<image><image>")}, "2 '<image>'"),
    "too_few_placeholders": (
        {"images": ["a.png", "b.png"], "conversations": _turns("<image> x")},
        "1 '<image>' placeholder(s) in the turns but 2 image(s)",
    ),
    "placeholder_without_image": ({"conversations": _turns("<image> x")}, "but 0 image(s)"),
    "escaping_path": ({"image": "../outside.png", "conversations": _turns("<image>")}, "outside image root"),
    "missing_image": ({"image": "nope.png", "conversations": _turns("<image>")}, "not found"),
}


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_bad_row_raises_bad_sample_naming_file_and_row(tmp_path: Path, root: Path, name: str) -> None:
    bad, message = BAD_ROWS[name]
    path = _write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], ROWS[1], bad, ROWS[0]])
    src = LlavaJsonSource(path, root)
    assert src[3].sample_id == "one"  # rows after the bad one still read
    with pytest.raises(BadSample) as info:
        src[2]
    text = str(info.value)
    assert str(path) in text and "row 2" in text and message in text, text


def test_json_list_with_bad_row(tmp_path: Path, root: Path) -> None:
    src = LlavaJsonSource(_write_json(tmp_path / "d.json", [ROWS[0], {"id": 1}]), root)
    with pytest.raises(BadSample, match=r"d\.json: row 1: 'conversations'"):
        src[1]


def test_unusable_files_raise_source_error(tmp_path: Path, root: Path) -> None:
    (tmp_path / "broken.json").write_text('[{"id": 1}')
    with pytest.raises(SourceError, match="broken.json"):
        LlavaJsonSource(tmp_path / "broken.json", root)
    # A file not starting with "[" is JSONL: a pretty-printed object is a set of malformed rows.
    src = LlavaJsonSource(_write_text(tmp_path / "obj.json", '{\n  "id": 1\n}\n'), root)
    assert len(src) == 3
    with pytest.raises(BadSample, match=r"obj\.json: row 0: malformed JSON"):
        src[0]


def test_jsonl_reads_lines_by_offset(tmp_path: Path, root: Path) -> None:
    rows = [{"id": f"r{i}", "conversations": _turns(f"q{i}", f"a{i}")} for i in range(50)]
    path = _write_jsonl(tmp_path / "big.jsonl", rows)
    with open(path, "a") as f:
        f.write("\n   \n")  # trailing blank lines are not rows
    src = LlavaJsonSource(path, root)
    assert len(src) == 50 and len(src._offsets) == 50 and src._rows is None
    assert src[49].sample_id == "r49" and src[0].sample_id == "r0"
    # Rows are read from disk on access, not kept: rewrite row 0 in place (same length) and see it.
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"r0"', b'"z0"', 1))
    assert src[0].sample_id == "z0"
    with pytest.raises(IndexError):
        src[50]


def test_captions(tmp_path: Path, root: Path) -> None:
    rows = [
        {"image": "a.png", "caption": "A red square."},
        {"image": "sub/c.png", "text": "Another one."},
        {"image": "a.png"},
        {"image": "../outside.png", "caption": "x"},
        {"caption": "no image"},
    ]
    src = CaptionSource(_write_jsonl(tmp_path / "cap.jsonl", rows), root)
    first = src[0]
    assert first.kind == "caption" and first.images == [str((root / "a.png").resolve())]
    assert first.conversations == [
        {"from": "human", "value": "<image>"},
        {"from": "gpt", "value": "A red square."},
    ]
    assert src[1].conversations[1]["value"] == "Another one."
    for i, message in [(2, "'caption' or 'text'"), (3, "outside image root"), (4, "exactly one image")]:
        with pytest.raises(BadSample, match=rf"cap\.jsonl: row {i}: .*{message}"):
            src[i]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _js(row: dict[str, Any]) -> bytes:
    return json.dumps(row).encode()


RED, GREEN, BLUE = _png((255, 0, 0)), _png((0, 255, 0)), _png((0, 0, 255))


def test_tar_shards_group_by_key_with_images_in_order(tmp_path: Path) -> None:
    shard0 = _tar(
        tmp_path / "s0.tar",
        [
            ("k1.json", _js({"id": "x", "conversations": _turns("<image> <image> <image>", "ok")})),
            # Out of order in the tar, and 10 > 2 numerically: order must be 0, 1, 2.
            ("k1.2.png", BLUE),
            ("k1.0.png", RED),
            ("k1.1.jpg", GREEN),
            ("k2.png", RED),
            ("k2.json", _js({"caption": "red"})),
            ("k2.txt", b"ignored"),
        ],
    )
    shard1 = _tar(tmp_path / "s1.tar", [("d/k1.json", _js({"conversations": _turns("hi", "yo")}))])
    src = TarShardSource([shard0, shard1])
    assert len(src) == 3
    assert src.keys == [(str(shard0), "k1"), (str(shard0), "k2"), (str(shard1), "d/k1")]
    first = src[0]
    assert first.images == ["k1.0.png", "k1.1.jpg", "k1.2.png"]
    assert first.image_bytes == [RED, GREEN, BLUE]
    assert first.sample_id == "x" and first.kind == "conversation" and first.source == str(shard0)
    caption = src.read(0, "k2")
    assert caption.kind == "caption" and caption.image_bytes == [RED] and caption.sample_id == "k2"
    assert caption.conversations[1] == {"from": "gpt", "value": "red"}
    text = src.read(1, "d/k1")
    assert text.kind == "text" and text.images == [] and text.image_bytes == []
    # The bytes are the PNGs themselves (decoding happens later).
    assert Image.open(io.BytesIO(first.image_bytes[1])).getpixel((0, 0)) == (0, 255, 0)


def test_tar_implicit_placeholder_and_numeric_order(tmp_path: Path) -> None:
    members = [("k.json", _js({"conversations": _turns(" ".join(["<image>"] * 11), "ok")}))]
    members += [(f"k.{n}.png", _png((n, 0, 0))) for n in (10, 9, 0, 1, 2, 3, 4, 5, 6, 7, 8)]
    members += [("s.json", _js({"conversations": _turns("Describe.", "ok")})), ("s.webp", RED)]
    src = TarShardSource([_tar(tmp_path / "s.tar", members)])
    assert src[0].images == [f"k.{n}.png" for n in range(11)]
    assert src[1].conversations[0]["value"] == "<image>\nDescribe."


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("../evil.json", _js({"caption": "x"})), ("../evil.png", RED)], "unsafe member name '../evil"),
        ([("/abs.json", _js({"caption": "x"}))], "unsafe member name '/abs.json'"),
        ([("k.png", RED)], "no k.json member"),
        ([("k.json", b"{not json"), ("k.png", RED)], "malformed k.json"),
        ([("k.json", _js({"caption": "x"})), ("k.png", RED), ("k.0.png", RED)], "mixes"),
        (
            [
                ("k.json", _js({"conversations": _turns("<image><image>")})),
                ("k.0.png", RED),
                ("k.2.png", RED),
            ],
            "0..n-1",
        ),
        (
            [("k.json", _js({"conversations": _turns("<image>")})), ("k.0.png", RED), ("k.1.png", RED)],
            "1 '<image>' placeholder(s) in the turns but 2 image(s)",
        ),
    ],
)
def test_tar_bad_members_raise_bad_sample(
    tmp_path: Path, members: list[tuple[str, bytes]], message: str
) -> None:
    good = [("ok.json", _js({"caption": "fine"})), ("ok.jpg", RED)]
    shard = _tar(tmp_path / "s.tar", [*good, *members])
    src = TarShardSource([shard])
    assert src[0].sample_id == "ok"
    with pytest.raises(BadSample) as info:
        src[1]
    assert str(shard) in str(info.value) and message in str(info.value), str(info.value)


def test_tar_symlink_member_is_bad(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        data = _js({"caption": "x"})
        info = tarfile.TarInfo("k.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("k.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(BadSample, match="not a regular file"):
        TarShardSource([path])[0]


@pytest.mark.parametrize("cut", ["mid_data", "mid_header", "no_trailer"])
def test_truncated_tar_names_the_shard(tmp_path: Path, cut: str) -> None:
    big = os.urandom(5000)
    shard = _tar(tmp_path / "s.tar", [("a.json", _js({"caption": "x"})), ("a.png", big), ("b.json", b"{}")])
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    png, last = members[1], members[2]
    size = {
        "mid_data": png.offset_data + 1000,
        "mid_header": last.offset + 100,
        "no_trailer": last.offset_data + _TAR_BLOCK,
    }[cut]
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data[:size])
    TarShardSource([shard])  # the intact one indexes fine
    with pytest.raises(SourceError, match=r"tar shard .*bad\.tar.* (truncated|cannot read)"):
        TarShardSource([shard, bad])


def test_not_a_tar_names_the_shard(tmp_path: Path) -> None:
    path = tmp_path / "junk.tar"
    path.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(SourceError, match=r"junk\.tar"):
        TarShardSource([path])


_TAR_BLOCK = 512


class _ListSource:
    """A source over fixed outcomes: a Record, or BadSample for None."""

    def __init__(self, good: list[bool], name: str = "list") -> None:
        self.good = good
        self.name = name

    def __len__(self) -> int:
        return len(self.good)

    def __getitem__(self, index: int) -> Record:
        if not self.good[index]:
            kind = "json" if index % 2 else "image"
            raise BadSample(self.name, f"row {index}", kind, "broken")
        return Record(self.name, index, f"{self.name}:{index}", _turns("hi"), [], None, "text")


def test_skipping_reader_counts_logs_and_continues(tmp_path: Path, root: Path) -> None:
    rows: list[Any] = [ROWS[0], "{bad", ROWS[1], {"id": 3}, ROWS[2]]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    lines: list[str] = []
    reader = SkippingReader(LlavaJsonSource(path, root), log=lines.append)
    got = [reader.get(i) for i in range(len(reader))]
    assert [r.sample_id if r else None for r in got] == ["one", None, "7", None, "two"]
    stats = reader.stats()
    assert (stats.samples, stats.bad, stats.reasons) == (5, 2, {"json": 1, "schema": 1})
    assert len(lines) == 2
    assert "row 1" in lines[0] and str(path) in lines[0] and "malformed JSON" in lines[0]
    assert "row 3" in lines[1]


def test_skipping_reader_stops_when_most_samples_are_bad() -> None:
    good = [i % 4 == 0 for i in range(40)]  # 75% bad
    reader = SkippingReader(
        _ListSource(good), max_bad_fraction=0.5, min_samples_for_check=20, log=lambda _: None
    )
    for i in range(19):
        reader.get(i)  # below min_samples_for_check: no stop yet
    with pytest.raises(RuntimeError, match="most samples are bad: 15 of 20") as info:
        reader.get(19)
    assert "'json'" in str(info.value) and "'image'" in str(info.value)
    # A mostly good source never stops.
    ok = SkippingReader(
        _ListSource([i % 4 != 0 for i in range(400)]), min_samples_for_check=20, log=lambda _: None
    )
    assert sum(ok.get(i) is None for i in range(400)) == 100
    assert ok.stats().bad == 100


def test_skipping_reader_does_not_swallow_other_errors() -> None:
    reader = SkippingReader(_ListSource([True]), log=lambda _: None)
    with pytest.raises(IndexError):
        reader.get(5)


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0, 1.0], [0.7, 0.0, 0.3], [0.01, 0.99]])
def test_blended_proportions_match_weights(weights: list[float]) -> None:
    sources = [_ListSource([True] * n, name=f"s{j}") for j, n in enumerate([7, 50, 3][: len(weights)])]
    size = 1000
    blend = BlendedSource(sources, weights, seed=1, size=size)
    assert len(blend) == size
    located = [blend.locate(i) for i in range(size)]
    total = sum(weights)
    for j, w in enumerate(weights):
        picks = [k for s, k in located if s == j]
        assert abs(len(picks) - w / total * size) <= 1, (j, len(picks))
        # Every prefix stays within one sample too.
        for n in (1, 10, 99, 500):
            assert abs(sum(s == j for s, _ in located[:n]) - w / total * n) <= 1
        if picks:
            n_j = len(sources[j])
            assert all(0 <= k < n_j for k in picks)
            # Each epoch of a source is a permutation of all its samples.
            full = len(picks) // n_j * n_j
            for e in range(0, full, n_j):
                assert sorted(picks[e : e + n_j]) == list(range(n_j))
    record = blend[0]
    assert record.source == f"s{located[0][0]}" and record.index == located[0][1]


def test_blended_is_deterministic_and_seeded() -> None:
    sources = [_ListSource([True] * 20), _ListSource([True] * 30)]
    a = BlendedSource(sources, [0.4, 0.6], seed=3, size=200)
    b = BlendedSource(sources, [0.4, 0.6], seed=3, size=200)
    c = BlendedSource(sources, [0.4, 0.6], seed=4, size=200)
    la, lb, lc = ([x.locate(i) for i in range(200)] for x in (a, b, c))
    assert la == lb
    assert la != lc
    # The seed changes the order within sources, not the source sequence.
    assert [s for s, _ in la] == [s for s, _ in lc]


def test_blended_rejects_bad_arguments() -> None:
    src = _ListSource([True])
    with pytest.raises(ValueError, match="one weight per source"):
        BlendedSource([src], [0.5, 0.5], seed=0, size=3)
    with pytest.raises(ValueError, match="non-negative"):
        BlendedSource([src, src], [1.0, -1.0], seed=0, size=3)
    with pytest.raises(ValueError, match="no samples"):
        BlendedSource([src, _ListSource([])], [1.0, 1.0], seed=0, size=3)
    with pytest.raises(IndexError):
        BlendedSource([src], [1.0], seed=0, size=3).locate(3)
