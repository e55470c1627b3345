"""Visual question answering by exact match: LLaVA-format question files, normalization, scores.

A question file is a LLaVA JSON list (or JSONL, one record per line):
`{"id", "image", "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt",
"value": "A"}], "question_type" | "type": optional}`. The first human turn is the question (its
placeholder stays where the file put it), the first gpt turn after it the reference answer.

Exact match after normalization: lowercase, punctuation removed, the articles a / an / the
dropped, whitespace collapsed, so "The dog." matches "dog". Short-answer sets (counts, colours,
shapes, yes/no) are scored fairly this way; free-form answers would need a softer metric.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megamm.inference.generation import GenerationConfig
from megamm.inference.session import InferenceSession

UNTYPED = "all"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({ch: " " for ch in string.punctuation})


@dataclass(frozen=True)
class VqaItem:
    id: str
    image: str | None
    question: str
    answer: str
    type: str = UNTYPED


@dataclass
class TypeScore:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class VqaScore:
    """Overall and per-question-type exact-match accuracy."""

    overall: TypeScore = field(default_factory=TypeScore)
    by_type: dict[str, TypeScore] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "accuracy": self.overall.accuracy, "correct": self.overall.correct, "total": self.overall.total,
            "by_type": {name: {"accuracy": s.accuracy, "correct": s.correct, "total": s.total}
                        for name, s in sorted(self.by_type.items())},
        }


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation to spaces, articles removed, whitespace collapsed."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def is_correct(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def score(predictions: Sequence[str], items: Sequence[VqaItem]) -> VqaScore:
    """Exact-match accuracy of `predictions` against the items' answers, overall and by type."""
    if len(predictions) != len(items):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} questions")
    result = VqaScore()
    for prediction, item in zip(predictions, items, strict=True):
        hit = int(is_correct(prediction, item.answer))
        for bucket in (result.overall, result.by_type.setdefault(item.type, TypeScore())):
            bucket.correct += hit
            bucket.total += 1
    return result


def _item(record: object, where: str) -> VqaItem:
    if not isinstance(record, dict):
        raise TypeError(f"{where}: expected an object, got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise TypeError(f"{where}: no 'conversations' list")
    question = next((i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("from") in ("human", "user")), None)
    answer = None if question is None else next(
        (i for i in range(question + 1, len(turns))
         if isinstance(turns[i], dict) and turns[i].get("from") in ("gpt", "assistant")), None)
    if question is None or answer is None:
        raise ValueError(f"{where}: needs a human turn followed by a gpt turn")
    texts = [turns[question].get("value"), turns[answer].get("value")]
    if not all(isinstance(text, str) for text in texts):
        raise ValueError(f"{where}: turn values must be strings")
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError(f"{where}: 'image' must be a path string")
    kind = record.get("question_type", record.get("type", UNTYPED))
    return VqaItem(str(record.get("id", where)), image, texts[0], texts[1], str(kind))


def load_questions(path: str | Path) -> list[VqaItem]:
    """Read a LLaVA JSON list (or JSONL) question file; ValueError or TypeError naming the file and record."""
    path = Path(path)
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(records, list):
        raise TypeError(f"{path}: expected a JSON list of questions")
    return [_item(record, f"{path} record {index}") for index, record in enumerate(records)]


def prediction_records(items: Sequence[VqaItem], predictions: Sequence[str]) -> list[dict]:
    """One JSON-ready record per question: id, type, question, reference, prediction, correct."""
    return [
        {"id": item.id, "type": item.type, "question": item.question, "answer": item.answer,
         "prediction": prediction, "correct": is_correct(prediction, item.answer)}
        for item, prediction in zip(items, predictions, strict=True)
    ]


def format_score(result: VqaScore) -> str:
    """A short table: overall and each type's accuracy with counts."""
    lines = [f"exact match: {100 * result.overall.accuracy:.2f}% ({result.overall.correct}/{result.overall.total})"]
    for name, bucket in sorted(result.by_type.items()):
        lines.append(f"  {name:<20} {100 * bucket.accuracy:6.2f}% ({bucket.correct}/{bucket.total})")
    return "\n".join(lines)


def evaluate_vqa(
    session: InferenceSession,
    items: Sequence[VqaItem],
    config: GenerationConfig | None = None,
    image_root: str | Path | None = None,
    batch_size: int = 8,
    blank_image: bool = False,
) -> tuple[VqaScore, list[str]]:
    """Answer every item with `session` (images under `image_root`) and score; (score, predictions).

    blank_image: every image replaced by a uniform mean-colour image (the no-vision baseline).
    """
    questions = [(item.image, item.question) for item in items]
    answers = session.answer(questions, config, batch_size=batch_size, image_root=image_root, blank_image=blank_image)
    predictions = [answer.text for answer in answers]
    return score(predictions, items), predictions
