"""tools/make_shapes_dataset.py and megamm.data.shapes: the synthetic shapes VQA data set.

The answers are checked against the recorded scenes by a parser written here (not the generator's
code), and the scenes against the pixels of the written PNG files, so a question that does not follow
from the image fails one of the two checks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image

from megamm.data.shapes import BACKGROUND, COLORS, KINDS, REGIONS, SIZES
from megamm.data.sources import LlavaJsonSource

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["--seed", "3", "--train-images", "300", "--test-images", "60", "--questions-per-image", "4"]
QUESTION_TYPES = {"color", "shape", "count", "exist", "position", "size"}


def _load_tool() -> ModuleType:
    """tools/ is not a package: import the script from its path to call main() in-process."""
    path = ROOT / "tools" / "make_shapes_dataset.py"
    spec = importlib.util.spec_from_file_location("make_shapes_dataset", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "data"
    assert tool.main(["--out", str(out), *FLAGS]) == 0
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))


def _scenes(root: Path) -> dict[str, dict[str, Any]]:
    data = json.loads((root / "scenes.json").read_text(encoding="utf-8"))
    return {**data["train"], **data["test"]}


def test_same_seed_gives_identical_files_another_seed_differs(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    tool.main(["--out", str(again), *FLAGS])
    first, second = _files(dataset), _files(again)
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []
    assert {"train.json", "questions.json", "test.json", "captions.json", "scenes.json", "text.txt"} <= set(first)

    other = tmp_path / "other"
    tool.main(["--out", str(other), *[("4" if f == "3" else f) for f in FLAGS]])
    third = _files(other)
    assert first["train.json"] != third["train.json"]
    changed = [name for name in first if name.endswith(".png") and first[name] != third.get(name)]
    assert len(changed) > 0.9 * (300 + 60)


def test_every_row_loads_and_its_image_exists(dataset: Path) -> None:
    expected_kinds = {"train.json": QUESTION_TYPES | {"caption"}, "questions.json": QUESTION_TYPES,
                      "test.json": QUESTION_TYPES}
    expected_kinds["captions.json"] = {"caption"}
    expected_kinds.update({f"questions/{kind}.json": {kind} for kind in QUESTION_TYPES})
    for name, kinds in expected_kinds.items():
        rows = _rows(dataset / name)
        source = LlavaJsonSource(dataset / name, image_root=dataset)
        assert len(source) == len(rows) > 0
        assert len({row["id"] for row in rows}) == len(rows), f"{name}: duplicate ids"
        for index, row in enumerate(rows):
            record = source[index]
            assert record.kind == "conversation" and len(record.images) == 1
            assert Path(record.images[0]).is_file()
            assert Path(record.images[0]) == (dataset / row["image"]).resolve()
            human, gpt = (turn["value"] for turn in record.conversations)
            assert [turn["from"] for turn in record.conversations] == ["human", "gpt"]
            if name == "captions.json":
                assert human == "<image>"
            else:
                assert human.startswith("<image>\n") and human.count("<image>") == 1
            if row["question_type"] != "caption":
                assert re.fullmatch(r"[a-z0-9-]+", gpt), f"{name} row {index}: answer {gpt!r} is not one word"
        assert {row["question_type"] for row in rows} == kinds, name
    assert {row["image"] for row in _rows(dataset / "captions.json")} == {
        row["image"] for row in _rows(dataset / "train.json")
    }
    train_questions = [row for row in _rows(dataset / "train.json") if row["question_type"] != "caption"]
    assert _rows(dataset / "questions.json") == train_questions
    by_type = [row for kind in sorted(QUESTION_TYPES) for row in _rows(dataset / "questions" / f"{kind}.json")]
    assert sorted(by_type, key=lambda row: row["id"]) == sorted(train_questions, key=lambda row: row["id"])


def _one(shapes: list[dict[str, Any]], key: str, value: str) -> dict[str, Any]:
    matches = [s for s in shapes if s[key] == value]
    assert len(matches) == 1, f"ambiguous or missing referent: {len(matches)} shapes with {key}={value}"
    return matches[0]


def _referent(shapes: list[dict[str, Any]], phrase: str) -> dict[str, Any]:
    if phrase.endswith(" shape"):
        return _one(shapes, "color", phrase.removesuffix(" shape"))
    return _one(shapes, "kind", phrase)


def expected_answer(question: str, shapes: list[dict[str, Any]]) -> tuple[str, str]:
    """(question type, answer) of a question about a scene, derived from the scene alone."""
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        return "color", _one(shapes, "kind", m[1])["color"]
    if m := re.fullmatch(r"Which shape is (\w+)\?", question):
        return "shape", _one(shapes, "color", m[1])["kind"]
    if question == "How many shapes are there?":
        return "count", str(len(shapes))
    if m := re.fullmatch(r"Is there an? (\w+) shape\?", question):
        assert m[1] in COLORS
        return "exist", "yes" if any(s["color"] == m[1] for s in shapes) else "no"
    if m := re.fullmatch(r"Is there an? (\w+)\?", question):
        assert m[1] in KINDS
        return "exist", "yes" if any(s["kind"] == m[1] for s in shapes) else "no"
    if m := re.fullmatch(r"Where is the (\w+(?: shape)?)\?", question):
        return "position", _referent(shapes, m[1])["region"]
    if m := re.fullmatch(r"What size is the (\w+(?: shape)?)\?", question):
        return "size", _referent(shapes, m[1])["size"]
    raise AssertionError(f"unknown question {question!r}")


def test_answers_and_captions_follow_from_the_scene(dataset: Path) -> None:
    scenes = _scenes(dataset)
    for name in ("train.json", "questions.json", "test.json", "captions.json"):
        for row in _rows(dataset / name):
            shapes = scenes[row["image"]]["shapes"]
            human, gpt = (turn["value"] for turn in row["conversations"])
            if row["question_type"] == "caption":
                pieces = [f"a {s['size']} {s['color']} {s['kind']} at the {s['region']}" for s in shapes]
                assert [p for p in re.split(r", | and |\.$", gpt) if p] == pieces, (row["id"], gpt)
                continue
            question = human.removeprefix("<image>\n")
            assert expected_answer(question, shapes) == (row["question_type"], gpt), (row["id"], question)


def _assert_pixels_show_the_scenes(dataset: Path) -> list[tuple[int, int]]:
    """Center pixels have the shape's color, exactly the scene's colors appear as solid pixels, and
    the occupied 2x2 cells are the scene's regions (so the count answer is what the image shows).
    Returns the (width, height) of every image."""
    palette = {name: np.array(rgb, dtype=np.uint8) for name, rgb in COLORS.items()}
    sizes = []
    for path, scene in _scenes(dataset).items():
        pixels = np.asarray(Image.open(dataset / path).convert("RGB"))
        width, height = scene["width"], scene["height"]
        assert pixels.shape == (height, width, 3)
        sizes.append((width, height))
        shapes = scene["shapes"]
        assert 1 <= len(shapes) <= 3
        for s in shapes:
            x, y = (int(v) for v in s["center"])
            assert (pixels[y, x] == palette[s["color"]]).all(), (path, s)
        solid = {name for name, rgb in palette.items() if (pixels == rgb).all(axis=-1).any()}
        assert solid == {s["color"] for s in shapes}, path
        half_w, half_h = width // 2, height // 2
        occupied = set()
        for index, region in enumerate(REGIONS):
            row, column = divmod(index, 2)
            cell = pixels[row * half_h : (row + 1) * half_h, column * half_w : (column + 1) * half_w]
            if (cell != np.array(BACKGROUND, dtype=np.uint8)).any():
                occupied.add(region)
            color_here = {name for name, rgb in palette.items() if (cell == rgb).all(axis=-1).any()}
            assert color_here == {s["color"] for s in shapes if s["region"] == region}, (path, region)
        assert occupied == {s["region"] for s in shapes}, path
        larger = [s for s in shapes if s["size"] == "large"]
        smaller = [s for s in shapes if s["size"] == "small"]
        assert all(big["radius"] > small["radius"] for big in larger for small in smaller)
        assert all(s["radius"] < min(width, height) / 4 for s in shapes)  # inside the cell's shorter side
        assert {s["size"] for s in shapes} <= set(SIZES)
    return sizes


def test_pixels_show_the_scene(dataset: Path) -> None:
    assert set(_assert_pixels_show_the_scenes(dataset)) == {(64, 64)}


def test_several_sizes_and_aspect_ratios(tmp_path: Path) -> None:
    """--image-size with a list: image i of each split has size i modulo the list, wide and tall
    images show their scenes as square ones do (rectangular cells, round circles)."""
    out = tmp_path / "sizes"
    assert tool.main(["--out", str(out), "--train-images", "30", "--test-images", "9",
                      "--image-size", "32,48x32,32x64", "--max-shapes", "3"]) == 0
    sizes = [(32, 32), (48, 32), (32, 64)]
    scenes = _scenes(out)
    for split, count in (("train", 30), ("test", 9)):
        for index in range(count):
            scene = scenes[f"images/{split}_{index}.png"]
            assert (scene["width"], scene["height"]) == sizes[index % 3]
    assert set(_assert_pixels_show_the_scenes(out)) == set(sizes)


def test_image_after_text_moves_only_the_placeholder(dataset: Path, tmp_path: Path) -> None:
    """--image-after-text: the same images, answers and captions.json; every human turn of the other
    files is the default's text first, then the placeholder on its own line."""
    after = tmp_path / "after"
    assert tool.main(["--out", str(after), *FLAGS, "--image-after-text"]) == 0
    before_files, after_files = _files(dataset), _files(after)
    assert sorted(before_files) == sorted(after_files)
    changed = {name for name in before_files if before_files[name] != after_files[name]}
    assert changed == {"train.json", "questions.json", "test.json",
                       *(f"questions/{kind}.json" for kind in QUESTION_TYPES)}
    for name in sorted(changed):
        old_rows, new_rows = _rows(dataset / name), _rows(after / name)
        assert len(old_rows) == len(new_rows) > 0
        for old, new in zip(old_rows, new_rows, strict=True):
            (old_human, old_gpt), (new_human, new_gpt) = old["conversations"], new["conversations"]
            text = old_human["value"].removeprefix("<image>\n")
            assert text != old_human["value"] and new_human["value"] == f"{text}\n<image>"
            assert new_gpt == old_gpt and {**new, "conversations": None} == {**old, "conversations": None}
    assert len(LlavaJsonSource(after / "test.json", after)) == len(_rows(after / "test.json"))


def test_train_and_test_images_are_disjoint(dataset: Path) -> None:
    scenes = json.loads((dataset / "scenes.json").read_text(encoding="utf-8"))
    assert set(scenes["train"]).isdisjoint(scenes["test"])
    assert len(scenes["train"]) == 300 and len(scenes["test"]) == 60

    def digests(paths: list[str]) -> set[bytes]:
        return {hashlib.sha256(Image.open(dataset / p).convert("RGB").tobytes()).digest() for p in paths}

    assert digests(list(scenes["train"])).isdisjoint(digests(list(scenes["test"])))


def test_images_equal_to_avoided_ones_are_redrawn(tmp_path: Path) -> None:
    """With every first draw forbidden, each image is drawn again (and again deterministically)."""
    args = tool.parse_args(["--out", str(tmp_path / "unused"), "--max-shapes", "1", "--image-size", "32"])
    _, first_digests = tool.generate_split("test", 20, args, set(), tmp_path / "a")
    second, second_digests = tool.generate_split("test", 20, args, first_digests, tmp_path / "b")
    assert len(first_digests) > 1 and first_digests.isdisjoint(second_digests)
    third, _ = tool.generate_split("test", 20, args, first_digests, tmp_path / "a")
    assert [s.scene for s in third] == [s.scene for s in second]


def test_answers_are_balanced(dataset: Path) -> None:
    """yes/no within one per existence form, and no answer much more common than chance for its type,
    so a model that ignores the image scores about chance."""
    for name in ("train.json", "test.json"):
        rows = [row for row in _rows(dataset / name) if row["question_type"] != "caption"]
        by_form = Counter(
            (row["conversations"][0]["value"].endswith(" shape?"), row["conversations"][1]["value"])
            for row in rows
            if row["question_type"] == "exist"
        )
        for form in (False, True):
            assert by_form[(form, "yes")] > 0 and abs(by_form[(form, "yes")] - by_form[(form, "no")]) <= 1
        if name == "train.json":
            for kind, choices in {"color": 6, "shape": 4, "count": 3, "position": 4, "size": 2}.items():
                answers = Counter(
                    row["conversations"][1]["value"] for row in rows if row["question_type"] == kind
                )
                assert len(answers) == choices, (kind, answers)
                assert max(answers.values()) / sum(answers.values()) < 1.5 / choices, (kind, answers)


def test_summary_and_text_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "small"
    tool.main(["--out", str(out), "--train-images", "40", "--test-images", "10", "--image-size", "32"])
    printed = capsys.readouterr().out
    for split in ("train", "test"):
        for kind in QUESTION_TYPES:
            assert re.search(
                rf"^{split}: {kind} +\d+ +\d+ +0\.\d+ +(0|1)\.\d+ \('[a-z0-9-]+'\)$", printed, re.MULTILINE
            )
    lines = (out / "text.txt").read_text(encoding="utf-8").splitlines()
    texts = [
        turn["value"].removeprefix("<image>").strip()
        for name in ("train.json", "test.json")
        for row in _rows(out / name)
        for turn in row["conversations"]
    ]
    assert lines == [t for t in texts if t] and "<image>" not in "\n".join(lines)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-shapes", "5"], "--max-shapes must be between 1 and 4"),
        (["--image-size", "16"], "--image-size must be at least 32"),
        (["--image-size", "64,48x16"], "at least 32 a side (smaller shapes are not recognizable), got 48x16"),
        (["--image-size", "64,4x4x4"], "--image-size entry '4x4x4' is neither"),
        (["--questions-per-image", "7"], "--questions-per-image must be between 1 and 6"),
        (["--seed", "-1"], "--seed must be non-negative"),
    ],
)
def test_bad_flags_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit):
        tool.main(["--out", str(tmp_path / "new"), *flags])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_non_empty_output_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(SystemExit):
        tool.main(["--out", str(tmp_path)])
    assert "is not an empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
