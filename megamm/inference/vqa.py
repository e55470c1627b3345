"""Visual question answering by exact match: LLaVA-format question files, normalization, scores.

A question file is a LLaVA JSON list (or JSONL, one record per line):
`{"id", "image", "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt",
"value": "A"}], "question_type" | "type": optional}`. The first human turn is the question (its
placeholder stays where the file put it), the first gpt turn after it the reference answer. Questions
without a type are scored under the type `UNTYPED` ("(untyped)"); the score of all questions together
is the row `OVERALL` ("overall") of `format_score`.

Exact match after normalization: lowercase, punctuation removed, the articles a / an / the
dropped, whitespace collapsed, so "The dog." matches "dog". Short-answer sets (counts, colours,
shapes, yes/no) are scored fairly this way; free-form answers would need a softer metric.

Errors. A question whose image cannot be loaded (missing, outside the image root, unreadable) is not
answered and not scored: it is counted under its type's `errors` (and the overall row's), and its
prediction record carries the message; the other questions are scored as usual. Accuracy is over the
questions scored.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from megamm.inference.generation import GenerationConfig
from megamm.inference.session import InferenceSession

UNTYPED = "(untyped)"
OVERALL = "overall"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({ch: " " for ch in string.punctuation})


@dataclass(frozen=True)
class VqaItem:
    """One question: id, image path (None: text only), question, reference answer, question type."""

    id: str
    image: str | None
    question: str
    answer: str
    type: str = UNTYPED


@dataclass
class TypeScore:
    """Counts of one question type (or of all): `total` questions scored, `correct` of them, and
    `errors` questions that could not be scored (their image failed to load)."""

    correct: int = 0
    total: int = 0
    errors: int = 0

    @property
    def accuracy(self) -> float:
        """correct / total over the questions scored; 0.0 when none was."""
        return self.correct / self.total if self.total else 0.0

    @property
    def questions(self) -> int:
        """All questions of the type, scored or not."""
        return self.total + self.errors

    def as_dict(self) -> dict[str, float | int]:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total, "errors": self.errors}


@dataclass
class VqaScore:
    """Overall and per-question-type exact-match accuracy, with the errors counted alike."""

    overall: TypeScore = field(default_factory=TypeScore)
    by_type: dict[str, TypeScore] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """{"accuracy", "correct", "total", "errors" (overall), "by_type": {type: the same four}}."""
        return {**self.overall.as_dict(), "by_type": {name: s.as_dict() for name, s in _ordered(self.by_type)}}


class VqaRun(NamedTuple):
    """What `evaluate_vqa` returns: the score, each question's predicted text ("" where it was not
    answered) and the errors by question index (the questions not scored, with the reason)."""

    score: VqaScore
    predictions: list[str]
    errors: dict[int, str]


def _ordered(by_type: Mapping[str, TypeScore]) -> list[tuple[str, TypeScore]]:
    """Types by name, the untyped questions last."""
    return sorted(by_type.items(), key=lambda pair: (pair[0] == UNTYPED, pair[0]))


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation to spaces, articles removed, whitespace collapsed."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def is_correct(prediction: str, reference: str) -> bool:
    """Whether `prediction` equals `reference` after `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


def score(
    predictions: Sequence[str], items: Sequence[VqaItem], errors: Mapping[int, str] | None = None
) -> VqaScore:
    """Exact-match accuracy of `predictions` against the items' answers, overall and by type.

    errors: item index -> message for the questions that were not answered; they count as errors of
    their type instead of being scored (their predictions are ignored).
    """
    if len(predictions) != len(items):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} questions")
    errors = errors or {}
    result = VqaScore()
    for index, (prediction, item) in enumerate(zip(predictions, items, strict=True)):
        failed = index in errors
        hit = int(not failed and is_correct(prediction, item.answer))
        for bucket in (result.overall, result.by_type.setdefault(item.type, TypeScore())):
            bucket.errors += failed
            bucket.total += not failed
            bucket.correct += hit
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
    kind = record.get("question_type", record.get("type"))
    kind = UNTYPED if kind is None or not str(kind).strip() else str(kind)
    return VqaItem(str(record.get("id", where)), image, texts[0], texts[1], kind)


def load_questions(path: str | Path) -> list[VqaItem]:
    """Read a LLaVA JSON list (or JSONL) question file; ValueError or TypeError naming the file and
    record, and ValueError for a file without questions."""
    path = Path(path)
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(records, list):
        raise TypeError(f"{path}: expected a JSON list of questions")
    if not records:
        raise ValueError(f"{path}: no questions in the file (nothing to score)")
    return [_item(record, f"{path} record {index}") for index, record in enumerate(records)]


def prediction_records(
    items: Sequence[VqaItem], predictions: Sequence[str], errors: Mapping[int, str] | None = None
) -> list[dict]:
    """One JSON-ready record per question: id, type, question, reference, prediction, correct, error.

    A question in `errors` (index -> message) has prediction None, correct False and the message as
    its error; the others have error None.
    """
    errors = errors or {}
    records = []
    for index, (item, prediction) in enumerate(zip(items, predictions, strict=True)):
        error = errors.get(index)
        records.append(
            {"id": item.id, "type": item.type, "question": item.question, "answer": item.answer,
             "prediction": None if error is not None else prediction,
             "correct": error is None and is_correct(prediction, item.answer), "error": error}
        )
    return records


def format_score(result: VqaScore) -> str:
    """A table: one row per question type (untyped questions as "(untyped)", last), then "overall";
    columns accuracy (over the questions scored; "-" when none was), correct, scored, errors."""
    width = max([20, *(len(name) for name in result.by_type)])
    lines = [f"{'question type':<{width}} {'accuracy':>8} {'correct':>7} {'scored':>7} {'errors':>6}"]
    for name, bucket in [*_ordered(result.by_type), (OVERALL, result.overall)]:
        accuracy = f"{100 * bucket.accuracy:.2f}%" if bucket.total else "-"
        lines.append(f"{name:<{width}} {accuracy:>8} {bucket.correct:>7} {bucket.total:>7} {bucket.errors:>6}")
    return "\n".join(lines)


def evaluate_vqa(
    session: InferenceSession,
    items: Sequence[VqaItem],
    config: GenerationConfig | None = None,
    image_root: str | Path | None = None,
    batch_size: int = 8,
    blank_image: bool = False,
) -> VqaRun:
    """Answer every item with `session` (images under `image_root`) and score; (score, predictions,
    errors). A question whose image cannot be loaded is an error, not a failure of the run.

    blank_image: every image replaced by a uniform mean-colour image (the no-vision baseline).
    """
    questions = [(item.image, item.question) for item in items]
    answers = session.answer(questions, config, batch_size=batch_size, image_root=image_root,
                             blank_image=blank_image, skip_bad_images=True)
    predictions = [answer.text for answer in answers]
    errors = {index: answer.error for index, answer in enumerate(answers) if answer.error is not None}
    return VqaRun(score(predictions, items, errors), predictions, errors)
