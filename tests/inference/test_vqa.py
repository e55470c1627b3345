"""megamm.inference.vqa and tools/evaluate_vqa.py: answer normalization, exact-match scores by type on a
hand-built prediction set, question-file parsing and its errors, questions whose image is missing or
unreadable (counted as errors of their type, the rest scored), the tool's exit status on bad input,
and the blank-image baseline inputs (also as the second pass of one run).

The tool also runs end to end from a trained checkpoint (one process and tp=2) in
tests/inference/test_generation.py.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

from megamm.config.anyres import AnyResConfig, image_tokens, tiles_per_image
from megamm.data.images import ImageError, mean_fill
from megamm.inference import cli
from megamm.inference.generation import GenerationConfig, generate
from megamm.inference.session import Answer, DataSettings, InferenceSession, data_settings, stop_token_ids
from megamm.inference.vqa import (
    OVERALL,
    UNTYPED,
    VqaItem,
    evaluate_vqa,
    format_score,
    is_correct,
    load_questions,
    normalize_answer,
    prediction_records,
    score,
)
from megamm.models.llava import LlavaModel
from megamm.parallel.state import ParallelState
from tests.data.test_templates import CharTokenizer
from tests.tiny import llava_config

ROOT = Path(__file__).resolve().parents[2]


def _load_tool() -> ModuleType:
    """tools/ is not a package: import evaluate_vqa.py from its path to call main() in-process."""
    spec = importlib.util.spec_from_file_location("evaluate_vqa_tool", ROOT / "tools" / "evaluate_vqa.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("text", "normalized"),
    [("The Dog.", "dog"), ("  a  red   Square! ", "red square"), ("an apple", "apple"), ("Yes", "yes"),
     ("there are 3 circles", "there are 3 circles"), ("theatre", "theatre"), ("it's blue", "it s blue")],
)
def test_normalize_answer(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


def _items() -> list[VqaItem]:
    return [
        VqaItem("1", "a.png", "<image>\nColour?", "Red", "color"),
        VqaItem("2", "b.png", "<image>\nColour?", "blue", "color"),
        VqaItem("3", "c.png", "<image>\nShape?", "a circle", "shape"),
        VqaItem("4", "d.png", "<image>\nHow many?", "3", "count"),
        VqaItem("5", None, "Yes or no?", "yes"),
    ]


def test_scores_overall_and_by_type() -> None:
    predictions = ["red.", "Green", "The circle", "three", "Yes!"]
    result = score(predictions, _items())
    assert (result.overall.correct, result.overall.total) == (3, 5)
    assert result.overall.accuracy == pytest.approx(0.6)
    by_type = {name: (s.correct, s.total, s.errors) for name, s in result.by_type.items()}
    assert by_type == {"color": (1, 2, 0), "shape": (1, 1, 0), "count": (0, 1, 0), UNTYPED: (1, 1, 0)}
    assert result.as_dict()["by_type"]["color"] == {"accuracy": 0.5, "correct": 1, "total": 2, "errors": 0}
    assert list(result.as_dict()["by_type"]) == ["color", "count", "shape", "(untyped)"]
    table = format_score(result).splitlines()
    assert table[0].split() == ["question", "type", "accuracy", "correct", "scored", "errors"]
    assert [row.split()[0] for row in table[1:]] == ["color", "count", "shape", "(untyped)", "overall"]
    assert table[-1].split() == ["overall", "60.00%", "3", "5", "0"]
    assert table[2].split() == ["count", "0.00%", "0", "1", "0"]
    records = prediction_records(_items(), predictions)
    assert [r["correct"] for r in records] == [True, False, True, False, True]
    assert records[2] == {"id": "3", "type": "shape", "question": "<image>\nShape?", "answer": "a circle",
                          "prediction": "The circle", "correct": True, "error": None}
    assert is_correct("A Circle", "circle")
    with pytest.raises(ValueError, match="4 predictions for 5 questions"):
        score(predictions[:4], _items())


def test_load_questions_json_and_jsonl(tmp_path: Path) -> None:
    records = [
        {"id": 7, "image": "x.png", "question_type": "color",
         "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]},
        {"id": "8", "type": "shape", "conversations": [
            {"from": "system", "value": "s"}, {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "B"},
            {"from": "human", "value": "later"}, {"from": "gpt", "value": "ignored"}]},
        {"conversations": [{"from": "human", "value": "Q3"}, {"from": "gpt", "value": "C"}]},
    ]
    (tmp_path / "q.json").write_text(json.dumps(records))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    expected = [
        VqaItem("7", "x.png", "<image>\nQ?", "A", "color"),
        VqaItem("8", None, "Q2", "B", "shape"),
        VqaItem(f"{tmp_path / 'q.json'} record 2", None, "Q3", "C", "(untyped)"),
    ]
    assert load_questions(tmp_path / "q.json") == expected
    assert [item.question for item in load_questions(tmp_path / "q.jsonl")] == ["<image>\nQ?", "Q2", "Q3"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"a": 1}', "expected a JSON list"),
        ("[1]", "record 0: expected an object"),
        ('[{"id": 1}]', "record 0: no 'conversations' list"),
        ('[{"conversations": [{"from": "gpt", "value": "A"}]}]', "record 0: needs a human turn followed by a gpt"),
        ('[{"image": 3, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]',
         "'image' must be a path string"),
    ],
)
def test_question_file_errors_name_the_record(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises((ValueError, TypeError), match=message):
        load_questions(path)


def test_errors_count_under_their_type_not_in_the_accuracy() -> None:
    predictions = ["red", "", "circle", "", "no"]
    errors = {1: "image file 'b.png' not found", 3: "cannot decode image 'd.png'"}
    result = score(predictions, _items(), errors)
    assert (result.overall.correct, result.overall.total, result.overall.errors) == (2, 3, 2)
    assert result.overall.questions == 5 and result.overall.accuracy == pytest.approx(2 / 3)
    by_type = {name: (s.correct, s.total, s.errors) for name, s in result.by_type.items()}
    assert by_type == {"color": (1, 1, 1), "shape": (1, 1, 0), "count": (0, 0, 1), UNTYPED: (0, 1, 0)}
    assert result.as_dict()["errors"] == 2 and result.as_dict()["by_type"]["count"]["errors"] == 1
    rows = {row.split()[0]: row.split()[1:] for row in format_score(result).splitlines()[1:]}
    assert rows["count"] == ["-", "0", "0", "1"]  # nothing scored: no accuracy shown
    assert rows["color"] == ["100.00%", "1", "1", "1"]
    assert rows[OVERALL] == ["66.67%", "2", "3", "2"]
    records = prediction_records(_items(), predictions, errors)
    assert records[1]["prediction"] is None and records[1]["correct"] is False
    assert records[1]["error"] == "image file 'b.png' not found"
    assert [r["error"] is None for r in records] == [True, False, True, False, True]


class _RecordingSession:
    """Stands in for InferenceSession.answer: records the request, answers from a table; an image in
    `missing` fails as a missing file does."""

    def __init__(self, replies: dict[str, str], missing: frozenset[str] = frozenset()) -> None:
        self.replies = replies
        self.missing = missing
        self.calls: list[dict] = []

    def answer(self, questions, config, batch_size, image_root, blank_image, skip_bad_images=False):
        self.calls.append({"questions": questions, "image_root": image_root, "blank_image": blank_image,
                           "batch_size": batch_size})
        answers = []
        for image, question in questions:
            if image in self.missing:
                if not skip_bad_images:
                    raise ImageError(f"image file {image!r} not found")
                answers.append(Answer("", [], "error", error=f"image file {image!r} not found"))
            else:
                answers.append(Answer(self.replies[question], [], "stop"))
        return answers


def test_evaluate_vqa_passes_images_and_baseline_flag() -> None:
    items = _items()[:3]
    session = _RecordingSession({"<image>\nColour?": "red", "<image>\nShape?": "circle"})
    result, predictions, errors = evaluate_vqa(session, items, image_root="root", batch_size=2, blank_image=True)  # type: ignore[arg-type]
    assert predictions == ["red", "red", "circle"] and errors == {}
    assert (result.overall.correct, result.by_type["color"].correct) == (2, 1)
    assert session.calls == [{"questions": [("a.png", "<image>\nColour?"), ("b.png", "<image>\nColour?"),
                                            ("c.png", "<image>\nShape?")],
                              "image_root": "root", "blank_image": True, "batch_size": 2}]


def test_evaluate_vqa_scores_the_rest_when_an_image_is_missing() -> None:
    session = _RecordingSession({"<image>\nColour?": "red", "<image>\nShape?": "circle",
                                 "<image>\nHow many?": "3", "Yes or no?": "yes"}, missing=frozenset({"b.png"}))
    result, predictions, errors = evaluate_vqa(session, _items())  # type: ignore[arg-type]
    assert errors == {1: "image file 'b.png' not found"}
    assert (result.overall.correct, result.overall.total, result.overall.errors) == (4, 4, 1)
    color = result.by_type["color"]
    assert (color.correct, color.total, color.errors) == (1, 1, 1)
    assert predictions[0] == "red" and predictions[2:] == ["circle", "3", "yes"]


class _AsciiTokenizer(CharTokenizer):
    """The character tokenizer restricted to ASCII, so a tiny model's vocabulary covers it."""

    @property
    def vocab_size(self) -> int:
        return 1000 + 0x80

    def decode(self, ids: list[int]) -> str:
        """Ids between the special tokens and the characters (which an untrained model may generate)
        decode to "?"."""
        known = super().decode
        return "".join("?" if len(self._tokens) <= i < 1000 else known([i]) for i in ids)


def _session(normalization: str = "clip", **settings) -> InferenceSession:
    tokenizer = _AsciiTokenizer()
    config = llava_config()
    config.language.image_token_id = tokenizer.image_token_id
    config.language.vocab_size = tokenizer.vocab_size
    model = LlavaModel(config, ParallelState.single())
    model.initialize(0)
    return InferenceSession(model, tokenizer, DataSettings("fake", "llava_v1", normalization=normalization, **settings))


def test_blank_image_is_the_mean_colour_and_keeps_the_token_count() -> None:
    session = _session()
    photo = Image.new("RGB", (30, 20), (10, 200, 90))
    blank = session.blank_like(photo)
    assert blank.size == (30, 20) and blank.getcolors() == [(600, mean_fill("clip"))]
    real = session.prompt("What colour?", photo)
    baseline = session.prompt("What colour?", photo, blank_image=True)
    assert real.input_ids == baseline.input_ids
    assert baseline.pixel_values.abs().max() < 0.02  # the (truncated) mean colour normalizes to ~0
    assert not torch.equal(real.pixel_values, baseline.pixel_values)
    tiled = _session(max_image_tiles=4)
    prompt = tiled.prompt("<image>\nWhat colour?", Image.new("RGB", (64, 32)), blank_image=True)
    tokens = tiled.model.image_tokens_per_image
    assert prompt.pixel_values.shape[0] == 3  # 2 tiles + thumbnail
    assert prompt.input_ids.count(tiled.tokenizer.image_token_id) == 3 * tokens


def test_data_settings_from_checkpoint_and_overrides() -> None:
    config = llava_config()
    tree = {"training": {"tokenizer_model": "tok.model", "chat_template": "chatml", "max_image_tiles": 2}}
    settings = data_settings(tree, config)
    assert settings == DataSettings("tok.model", "chatml", "pad", 2, "clip")
    assert data_settings(tree, config, chat_template="llama3", image_aspect_ratio=None).chat_template == "llama3"
    config.vision.family = "siglip"  # the statistics follow the tower family
    assert data_settings(tree, config).normalization == "siglip"
    tree["training"]["image_normalization"] = "clip"
    assert data_settings(tree, config).normalization == "clip"
    with pytest.raises(ValueError, match="names no tokenizer(.|\n)*unknown chat template 'x'"):
        data_settings({}, config, chat_template="x")
    tokenizer = CharTokenizer()
    assert stop_token_ids(tokenizer, "llava_v1") == (tokenizer.eos_id,)
    assert stop_token_ids(tokenizer, "chatml") == (tokenizer.eos_id, tokenizer.token_id("<|im_end|>"))


# --------------------------------------------------------------------------- a real session and the tool


@pytest.fixture(scope="module")
def tiny_session() -> InferenceSession:
    return _session()


def _images(root: Path) -> Path:
    """red.png (readable), broken.png (not an image); missing.png does not exist."""
    root.mkdir(exist_ok=True)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(root / "red.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def test_session_skips_bad_images_only_when_asked(tmp_path: Path, tiny_session: InferenceSession) -> None:
    root = _images(tmp_path / "images")
    questions = [("red.png", "<image>\nColour?"), ("missing.png", "<image>\nColour?"),
                 ("broken.png", "Shape?"), (None, "Yes or no?")]
    config = tiny_session.generation_config(max_new_tokens=3)
    with pytest.raises(ImageError, match="missing.png"):
        tiny_session.answer(questions, config, batch_size=2, image_root=root)
    answers = tiny_session.answer(questions, config, batch_size=2, image_root=root, skip_bad_images=True)
    assert [a.error is None for a in answers] == [True, False, False, True]
    assert "missing.png" in str(answers[1].error) and "broken.png" in str(answers[2].error)
    assert (answers[1].text, answers[1].tokens, answers[1].finish_reason) == ("", [], "error")
    good = tiny_session.answer([questions[0], questions[3]], config, batch_size=2, image_root=root)
    assert [answers[0].tokens, answers[3].tokens] == [a.tokens for a in good]
    assert all(a.tokens for a in good)


def _question(qid: str, image: str | None, kind: str | None, answer: str = "red") -> dict:
    record: dict = {"id": qid, "conversations": [{"from": "human", "value": "What colour?"},
                                                 {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    if kind is not None:
        record["question_type"] = kind
    return record


def _run_tool(monkeypatch: pytest.MonkeyPatch, session: InferenceSession, *args: str) -> int:
    """tools/evaluate_vqa.py's main with `session` standing in for the checkpoint's."""
    monkeypatch.setattr(cli, "open_session", lambda _args, _state: session)
    return _load_tool().main(["--load", "unused-checkpoint", "--device", "cpu", "--max-new-tokens", "2", *args])


def test_tool_scores_the_rest_when_an_image_is_missing(
    tmp_path: Path, tiny_session: InferenceSession, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = _images(tmp_path / "images")
    questions = root / "questions.json"
    questions.write_text(json.dumps([_question("q1", "red.png", "color"), _question("q2", "missing.png", "color"),
                                     _question("q3", None, None), _question("q4", "red.png", "shape")]))
    predictions = tmp_path / "predictions.jsonl"
    assert _run_tool(monkeypatch, tiny_session, "--questions", str(questions), "--predictions", str(predictions)) == 0
    out, err = capsys.readouterr()
    assert f"{questions}: 4 questions, exact match:" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert list(rows) == ["color", "shape", "(untyped)", "overall"]
    assert [rows[name][2:] for name in rows] == [["1", "1"], ["1", "0"], ["1", "0"], ["3", "1"]]  # scored, errors
    assert "1 of 4 questions not scored" in err and "missing.png" in err
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["id"] for r in records] == ["q1", "q2", "q3", "q4"]
    assert [r["type"] for r in records] == ["color", "color", "(untyped)", "shape"]
    assert records[1]["prediction"] is None and records[1]["correct"] is False
    assert "missing.png" in records[1]["error"] and "not found" in records[1]["error"]
    assert [r["error"] for r in records[2:]] == [None, None] and records[0]["error"] is None
    assert _run_tool(monkeypatch, tiny_session, "--questions", str(questions), "--json", "--blank-image") == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["total"], summary["errors"], summary["blank_image"]) == (3, 1, True)
    assert summary["by_type"]["color"]["errors"] == 1 and summary["by_type"]["(untyped)"]["total"] == 1


def test_tool_scores_both_ways_in_one_run_with_and_blank_image(
    tmp_path: Path, tiny_session: InferenceSession, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--and-blank-image: the real pass, then the blank-image pass on the same session, each the same
    as its own run (JSON line, predictions beside --predictions' file); refused with --blank-image."""
    root = _images(tmp_path / "images")
    questions = root / "questions.json"
    questions.write_text(json.dumps([_question("q1", "red.png", "color"), _question("q2", "missing.png", "shape"),
                                     _question("q3", "red.png", "shape", answer="square")]))
    passes: list[bool] = []

    def recording(*args: object, **kwargs: object) -> object:
        passes.append(bool(kwargs["blank_image"]))
        return evaluate_vqa(*args, **kwargs)

    monkeypatch.setattr("megamm.inference.vqa.evaluate_vqa", recording)  # what the tool imports
    separate = {}
    for flags in ((), ("--blank-image",)):
        path = tmp_path / f"separate{len(flags)}.jsonl"
        assert _run_tool(monkeypatch, tiny_session, "--questions", str(questions), "--json",
                         "--predictions", str(path), *flags) == 0
        separate[bool(flags)] = (capsys.readouterr().out, path.read_text())
    assert passes == [False, True]
    both = tmp_path / "both.jsonl"
    assert _run_tool(monkeypatch, tiny_session, "--questions", str(questions), "--json", "--predictions",
                     str(both), "--and-blank-image") == 0
    out, err = capsys.readouterr()
    assert passes == [False, True, False, True]
    assert out == separate[False][0] + separate[True][0]
    assert [json.loads(line)["blank_image"] for line in out.splitlines()] == [False, True]
    assert both.read_text() == separate[False][1]
    assert (tmp_path / "both_blank.jsonl").read_text() == separate[True][1]
    assert err.count("1 of 3 questions not scored") == 2
    with pytest.raises(SystemExit):
        _run_tool(monkeypatch, tiny_session, "--questions", str(questions), "--blank-image", "--and-blank-image")
    assert "--and-blank-image already adds the --blank-image pass" in capsys.readouterr().err


def test_tool_fails_when_no_question_can_be_scored(
    tmp_path: Path, tiny_session: InferenceSession, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(_question(f"q{i}", "missing.png", "color")) + "\n" for i in range(2)))
    assert _run_tool(monkeypatch, tiny_session, "--questions", str(questions)) == 2
    out, err = capsys.readouterr()
    assert "overall" in out and "2 of 2 questions not scored" in err
    assert f"{questions}: no question could be scored; check --image-root" in err


@pytest.mark.parametrize(("name", "content"), [("q.json", "[]"), ("q.json", ""), ("q.jsonl", "\n  \n")])
def test_tool_refuses_an_empty_question_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    assert _load_tool().main(["--load", "unused-checkpoint", "--questions", str(path), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert err == f"evaluate_vqa.py: {path}: no questions in the file (nothing to score)\n" and out == ""
    with pytest.raises(ValueError, match="no questions"):
        load_questions(path)


def test_tool_names_a_missing_question_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nowhere.json"
    assert _load_tool().main(["--load", "unused-checkpoint", "--questions", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_untyped_questions_have_their_own_row(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    path.write_text(json.dumps([_question("q1", None, None), _question("q2", None, ""),
                                _question("q3", None, "all")]))
    items = load_questions(path)
    assert [item.type for item in items] == [UNTYPED, UNTYPED, "all"]
    table = format_score(score(["red", "blue", "red"], items)).splitlines()
    assert [row.split()[0] for row in table[1:]] == ["all", "(untyped)", "overall"]
    assert table[2].split()[1:] == ["50.00%", "1", "2", "0"] and table[3].split()[1:] == ["66.67%", "2", "3", "0"]


def test_anyres_prompt_tiles_the_image_and_generates() -> None:
    """An any-resolution (LLaVA-NeXT) model's prompt: the image's base image and tiles, its size, and
    the image-token run of that size, which the model's per-sample check accepts when generating."""
    session = _session()
    pinpoints = ((16, 32), (32, 16), (32, 32))
    model = LlavaModel(replace(session.model.config, anyres=AnyResConfig(pinpoints)), ParallelState.single())
    model.initialize(0)
    session = InferenceSession(model, session.tokenizer, session.settings)
    prompt = session.prompt("What colour?", Image.new("RGB", (30, 20), (10, 200, 90)))
    assert prompt.image_sizes.tolist() == [[20, 30]]
    assert prompt.pixel_values.shape[0] == tiles_per_image((20, 30), list(pinpoints), 16)
    assert prompt.input_ids.count(session.tokenizer.image_token_id) == image_tokens((20, 30), list(pinpoints), 16, 4)
    assert len(generate(model, [prompt], GenerationConfig(max_new_tokens=2))[0].tokens) == 2
