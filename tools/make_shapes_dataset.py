"""Generate the synthetic shapes visual-question-answering data set (LLaVA JSON format).

    python tools/make_shapes_dataset.py --out data/shapes [--seed 0] [--train-images 2000] \\
        [--test-images 200] [--image-size 64] [--questions-per-image 4] [--max-shapes 3] \\
        [--image-after-text]
    python tools/make_shapes_dataset.py --out data/shapes --image-size 32,48x32,32x64

--image-size is one size or a comma-separated list, each a side (square) or WIDTHxHEIGHT: image i of
each split gets size i modulo the list, so every size has its share in both splits (images at several
resolutions and aspect ratios, for a tower that takes each image at its own size).

Each image holds one to --max-shapes flat shapes (circle, square, triangle, cross; six colors; small
or large), one per cell of a 2x2 grid; see megamm.data.shapes for the scenes and the questions. The
questions need the image: no answer can be told from the question text better than by guessing the
most common answer of its type (the per-type counts and that majority baseline are printed at the end).

Writes into --out, which must be empty or not exist yet:

* `images/{train,test}_<index>.png` - the images.
* `train.json` - LLaVA rows for the train images: one caption row per image (human "<image>\\nDescribe
  the image.", gpt the caption) and up to --questions-per-image question rows (human "<image>\\n<question>",
  gpt a one-word answer). Every row has "question_type" (caption, color, shape, count, exist, position,
  size); "image" paths are relative to --out, which is the image root. With --image-after-text the
  human turns read "Describe the image.\\n<image>" and "<question>\\n<image>" (here and in test.json).
* `questions.json` - the question rows of train.json alone (instruction tuning without captions).
* `questions/<type>.json` - the question rows of one type (`questions/exist.json`, ...), for weighting
  the types in a `--data-path` blend ("0.75 train.json 0.25 questions/exist.json").
* `captions.json` - the caption rows alone with the bare "<image>" prompt, for stage-1 pretraining on
  the plain template.
* `test.json` - question rows for the held-out images (no caption rows: free text is not scored by
  exact match).
* `scenes.json` - the scene of every image (kinds, colors, sizes, regions, centers, radii), for tests and
  per-attribute error analysis.
* `text.txt` - every prompt, caption and answer of train.json and test.json, one per line, without the
  image placeholder, for training a tokenizer.

Deterministic: the same flags give byte-identical files. Every image has its own random stream, seeded
by (seed, split, index), so the test images do not depend on --train-images (but for the redraws that
follow). A test image whose pixels equal those of a train image is drawn again from the next stream of
its index (one-shape scenes do repeat), so no test image is seen in training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from megamm.data.shapes import (
    ANSWER_SETS,
    MAX_SHAPES,
    MIN_IMAGE_SIZE,
    QUESTION_TYPES,
    Question,
    QuestionGenerator,
    Scene,
    caption,
    render,
    sample_scene,
)

SPLITS = {"train": 0, "test": 1}  # the split's number in the image seeds
CAPTION_PROMPT = "Describe the image."
IMAGE_PLACEHOLDER = "<image>"
MAX_REDRAWS = 100


class ImageSample(NamedTuple):
    """One generated image: its path relative to the output directory, scene, caption and questions."""

    path: str
    scene: Scene
    caption: str
    questions: list[Question]


def image_sizes(text: str) -> list[tuple[int, int]]:
    """"64" or "32,48x32,32x64" -> [(width, height), ...]; ValueError naming the bad entry."""
    sizes = []
    for entry in text.split(","):
        parts = entry.strip().lower().split("x")
        if len(parts) > 2 or not all(part.isdigit() for part in parts):
            raise ValueError(f"--image-size entry {entry!r} is neither a side (64) nor WIDTHxHEIGHT (48x32)")
        width, height = int(parts[0]), int(parts[-1])
        if min(width, height) < MIN_IMAGE_SIZE:
            raise ValueError(f"--image-size must be at least {MIN_IMAGE_SIZE} a side (smaller shapes are not "
                             f"recognizable), got {entry.strip()}")
        sizes.append((width, height))
    return sizes


def size_label(sizes: list[tuple[int, int]]) -> str:
    return ", ".join(f"{w}x{h}" for w, h in sizes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory (new or empty)")
    parser.add_argument("--seed", type=int, default=0, help="non-negative random seed")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument(
        "--image-size", default="64",
        help=f"image side in pixels (>= {MIN_IMAGE_SIZE}) or WIDTHxHEIGHT; a comma-separated list gives image i "
        "the i-th size modulo the list",
    )
    parser.add_argument(
        "--questions-per-image",
        type=int,
        default=4,
        help=f"question types drawn per image, 1..{len(QUESTION_TYPES)}; a type the scene cannot answer "
        "unambiguously is dropped, so some images get fewer",
    )
    parser.add_argument(
        "--image-after-text", action="store_true",
        help="put the <image> placeholder after the prompt's text (\"<question>\\n<image>\"), as many LLaVA "
        "rows have it, so that a causal decoder's image tokens see the question; default: before it",
    )
    parser.add_argument(
        "--max-shapes", type=int, default=3, help=f"shapes per image: 1..N, N <= {MAX_SHAPES}"
    )
    args = parser.parse_args(argv)
    errors = []
    if args.seed < 0:
        errors.append(f"--seed must be non-negative, got {args.seed}")
    if args.train_images < 1:
        errors.append(f"--train-images must be at least 1, got {args.train_images}")
    if args.test_images < 0:
        errors.append(f"--test-images must be non-negative, got {args.test_images}")
    try:
        args.image_size = image_sizes(args.image_size)
    except ValueError as error:
        errors.append(str(error))
    if not 1 <= args.questions_per_image <= len(QUESTION_TYPES):
        errors.append(
            f"--questions-per-image must be between 1 and {len(QUESTION_TYPES)} (the number of question "
            f"types), got {args.questions_per_image}"
        )
    if not 1 <= args.max_shapes <= MAX_SHAPES:
        errors.append(
            f"--max-shapes must be between 1 and {MAX_SHAPES} (one shape per cell of a 2x2 grid), "
            f"got {args.max_shapes}"
        )
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        errors.append(f"--out {args.out} exists and is not an empty directory; choose a new one")
    if errors:
        parser.error("; ".join(errors))
    return args


def generate_split(
    split: str, count: int, args: argparse.Namespace, avoid: set[bytes], out: Path
) -> tuple[list[ImageSample], set[bytes]]:
    """Draw, render and write (under `out`) the images of one split; returns the samples and their
    pixel digests.

    An image whose pixel digest is in `avoid` is drawn again from the next random stream of the same
    index (so the result is still a function of the flags alone)."""
    generator = QuestionGenerator(args.questions_per_image)
    (out / "images").mkdir(parents=True, exist_ok=True)
    samples, digests = [], set()
    for index in range(count):
        for attempt in range(MAX_REDRAWS):
            rng = np.random.default_rng([args.seed, SPLITS[split], index, attempt])
            scene = sample_scene(rng, args.image_size[index % len(args.image_size)], args.max_shapes)
            image = render(scene)
            digest = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).digest()
            if digest not in avoid:
                break
        else:
            raise RuntimeError(
                f"{split} image {index}: {MAX_REDRAWS} draws all equal train images; use larger "
                "--image-size or --max-shapes"
            )
        digests.add(digest)
        name = f"images/{split}_{index}.png"
        image.save(out / name, format="PNG")
        samples.append(ImageSample(name, scene, caption(scene), generator.questions(scene, rng)))
    return samples, digests


def _row(row_id: str, image: str, prompt: str, answer: str, question_type: str) -> dict[str, Any]:
    return {
        "id": row_id,
        "image": image,
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
        "question_type": question_type,
    }


def prompt(text: str, image_after_text: bool) -> str:
    """The human turn: the image placeholder and `text` on lines of their own, in the order asked for."""
    return f"{text}\n{IMAGE_PLACEHOLDER}" if image_after_text else f"{IMAGE_PLACEHOLDER}\n{text}"


def split_rows(
    split: str, samples: list[ImageSample], with_captions: bool, image_after_text: bool = False
) -> list[dict[str, Any]]:
    """The rows of a split, image by image: the caption row first (if asked for), then the questions."""
    rows = []
    for index, sample in enumerate(samples):
        if with_captions:
            caption_prompt = prompt(CAPTION_PROMPT, image_after_text)
            rows.append(_row(f"{split}_{index}_caption", sample.path, caption_prompt, sample.caption, "caption"))
        for k, q in enumerate(sample.questions):
            rows.append(_row(f"{split}_{index}_q{k}", sample.path, prompt(q.text, image_after_text), q.answer, q.kind))
    return rows


def plain_caption_rows(samples: list[ImageSample]) -> list[dict[str, Any]]:
    """Caption rows with the bare image placeholder as the prompt (LLaVA's stage-1 format)."""
    return [
        _row(f"train_{i}_caption", s.path, IMAGE_PLACEHOLDER, s.caption, "caption")
        for i, s in enumerate(samples)
    ]


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def text_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        for turn in row["conversations"]:
            text = turn["value"].replace(IMAGE_PLACEHOLDER, "").strip()
            if text:
                lines.append(text)
    return lines


def answer_summary(split: str, rows: list[dict[str, Any]], max_shapes: int) -> list[str]:
    """Per question type: row count, answer-set size, uniform chance and the majority-answer baseline
    (the accuracy of always giving that type's most common answer, the best a text-only model can do)."""
    lines = [f"{split}: {'type':<9} {'rows':>6} {'answers':>7} {'chance':>7}  majority baseline"]
    by_type: dict[str, Counter[str]] = {}
    for row in rows:
        by_type.setdefault(row["question_type"], Counter())[row["conversations"][1]["value"]] += 1
    for kind in QUESTION_TYPES:
        answers = by_type.get(kind, Counter())
        total = sum(answers.values())
        size = max_shapes if kind == "count" else len(ANSWER_SETS[kind])
        if total:
            answer, n = answers.most_common(1)[0]
            majority = f"{n / total:.3f} ({answer!r})"
        else:
            majority = "-"
        lines.append(f"{split}: {kind:<9} {total:>6} {size:>7} {1 / size:>7.3f}  {majority}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Generate and write the data set; returns the process exit status."""
    args = parse_args(argv)
    start = time.perf_counter()
    train, train_digests = generate_split("train", args.train_images, args, set(), args.out)
    test, _ = generate_split("test", args.test_images, args, train_digests, args.out)

    after = args.image_after_text
    train_rows = split_rows("train", train, with_captions=True, image_after_text=after)
    test_rows = split_rows("test", test, with_captions=False, image_after_text=after)
    write_json(args.out / "train.json", train_rows)
    questions = [row for row in train_rows if row["question_type"] != "caption"]
    write_json(args.out / "questions.json", questions)
    (args.out / "questions").mkdir()
    for kind in QUESTION_TYPES:
        write_json(args.out / "questions" / f"{kind}.json", [row for row in questions if row["question_type"] == kind])
    write_json(args.out / "captions.json", plain_caption_rows(train))
    write_json(args.out / "test.json", test_rows)
    scenes = {
        split: {s.path: s.scene.to_json() for s in samples}
        for split, samples in (("train", train), ("test", test))
    }
    write_json(args.out / "scenes.json", scenes)
    (args.out / "text.txt").write_text("\n".join(text_lines(train_rows + test_rows)) + "\n", encoding="utf-8")
    elapsed = time.perf_counter() - start

    print(
        f"wrote {len(train)} train and {len(test)} test images ({size_label(args.image_size)} px), {len(train_rows)} "
        f"train rows ({len(train)} captions), {len(test_rows)} test rows to {args.out} in {elapsed:.2f} s"
    )
    for line in answer_summary("train", train_rows, args.max_shapes) + answer_summary(
        "test", test_rows, args.max_shapes
    ):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
