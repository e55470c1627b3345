"""megamm.inference.vqa: answer normalization, exact-match scores by type on a hand-built prediction set,
question-file parsing and its errors, and the blank-image baseline inputs.

The tools themselves run end to end (one process and tp=2) in tests/test_generation.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from megamm.data.images import mean_fill
from megamm.inference.session import Answer, DataSettings, InferenceSession, data_settings, stop_token_ids
from megamm.inference.vqa import (
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
from tests.test_templates import CharTokenizer
from tests.tiny import llava_config


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
    by_type = {name: (s.correct, s.total) for name, s in result.by_type.items()}
    assert by_type == {"color": (1, 2), "shape": (1, 1), "count": (0, 1), "all": (1, 1)}
    assert result.as_dict()["by_type"]["color"]["accuracy"] == pytest.approx(0.5)
    assert "exact match: 60.00% (3/5)" in format_score(result)
    records = prediction_records(_items(), predictions)
    assert [r["correct"] for r in records] == [True, False, True, False, True]
    assert records[2] == {"id": "3", "type": "shape", "question": "<image>\nShape?", "answer": "a circle",
                          "prediction": "The circle", "correct": True}
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
        VqaItem(f"{tmp_path / 'q.json'} record 2", None, "Q3", "C", "all"),
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


class _RecordingSession:
    """Stands in for InferenceSession.answer: records the request, answers from a table."""

    def __init__(self, replies: dict[str, str]) -> None:
        self.replies = replies
        self.calls: list[dict] = []

    def answer(self, questions, config, batch_size, image_root, blank_image):
        self.calls.append({"questions": questions, "image_root": image_root, "blank_image": blank_image,
                           "batch_size": batch_size})
        return [Answer(self.replies[q], [], "stop") for _, q in questions]


def test_evaluate_vqa_passes_images_and_baseline_flag() -> None:
    items = _items()[:3]
    session = _RecordingSession({"<image>\nColour?": "red", "<image>\nShape?": "circle"})
    result, predictions = evaluate_vqa(session, items, image_root="root", batch_size=2, blank_image=True)  # type: ignore[arg-type]
    assert predictions == ["red", "red", "circle"]
    assert (result.overall.correct, result.by_type["color"].correct) == (2, 1)
    assert session.calls == [{"questions": [("a.png", "<image>\nColour?"), ("b.png", "<image>\nColour?"),
                                            ("c.png", "<image>\nShape?")],
                              "image_root": "root", "blank_image": True, "batch_size": 2}]


class _AsciiTokenizer(CharTokenizer):
    """The character tokenizer restricted to ASCII, so a tiny model's vocabulary covers it."""

    @property
    def vocab_size(self) -> int:
        return 1000 + 0x80


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
