"""Small LLaVA-format datasets on disk (clean and corrupted), a tokenizer trained on their text, and a
tiny model config that matches the tokenizer; shared by the data pipeline tests."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from megamm.config import LlavaConfig
from megamm.data.tokenizer import load_tokenizer
from tests.data.test_tokenizer import train_tokenizer
from tests.tiny import llava_config

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
QUESTIONS = ("What color is the picture?", "Which color do you see?", "Name the color.")
SEQ_LENGTH = 64


@dataclass
class DatasetFiles:
    root: Path
    train: Path
    images: Path
    tokenizer: Path
    corrupted: dict[str, int]  # kind -> number of rows of that kind


def _conversation(rng: random.Random, color: str | None) -> list[dict[str, str]]:
    if color is None:
        return [{"from": "human", "value": "Say a color."}, {"from": "gpt", "value": rng.choice(list(COLORS))}]
    question = rng.choice(QUESTIONS)
    prefix = "<image>\n" if rng.random() < 0.5 else ""
    return [
        {"from": "human", "value": prefix + question if prefix else question + "\n<image>"},
        {"from": "gpt", "value": f"It is {color}."},
    ]


def write_dataset(root: Path, rows: int = 24, seed: int = 0, corrupt: bool = False) -> DatasetFiles:
    """`rows` good rows (images of several sizes, a few text-only), plus one row of each corruption."""
    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True)
    lines: list[str] = []
    for index in range(rows):
        if index % 6 == 5:
            lines.append(json.dumps({"id": f"text{index}", "conversations": _conversation(rng, None)}))
            continue
        color = rng.choice(list(COLORS))
        size = rng.choice([(16, 16), (24, 12), (12, 30)])
        name = f"img{index}.png"
        Image.new("RGB", size, COLORS[color]).save(images / name)
        lines.append(json.dumps({"id": f"s{index}", "image": name, "conversations": _conversation(rng, color)}))
    corrupted: dict[str, int] = {}
    if corrupt:
        good_png = images / "img0.png"
        (images / "truncated.png").write_bytes(good_png.read_bytes()[:40])
        Image.new("1", (9000, 9000)).save(images / "bomb.png")
        (root / "outside.png").write_bytes(good_png.read_bytes())
        bad_rows = {
            "missing": {"image": "nope.png"},
            "truncated": {"image": "truncated.png"},
            "escape": {"image": "../outside.png"},
            "bomb": {"image": "bomb.png"},
        }
        for kind, extra in bad_rows.items():
            conversation = [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}]
            lines.append(json.dumps({"id": kind, **extra, "conversations": conversation}))
        lines.append('{"id": "broken", "conversations": [')  # malformed JSON line
        unanswered = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]
        lines.append(json.dumps({"id": "unanswered", "conversations": unanswered}))
        lines.append(json.dumps({"id": "not-text", "conversations": [{"from": "human", "value": 3}]}))
        two_placeholders = [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "red"}]
        lines.append(json.dumps({"id": "placeholders", "image": "img0.png", "conversations": two_placeholders}))
        corrupted = {"image": 4, "json": 1, "all_masked": 1, "schema": 1, "placeholders": 1}
    train = root / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    corpus = root / "corpus.txt"
    words = " ".join(COLORS) + " " + " ".join(QUESTIONS) + " It is Say a color. Hi Color?"
    corpus.write_text("\n".join([words] * 20) + "\n")
    prefix = root / "tok"
    assert train_tokenizer.main(["--input", str(corpus), "--model-prefix", str(prefix), "--vocab-size", "60"]) == 0
    return DatasetFiles(root, train, images, Path(f"{prefix}.model"), corrupted)


def model_for(tokenizer_path: Path, **overrides) -> LlavaConfig:
    """The tiny test LLaVA (16x16 images -> 16 image tokens) with the tokenizer's vocabulary."""
    tokenizer = load_tokenizer(tokenizer_path)
    config = llava_config(**overrides)
    language = replace(config.language, vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_token_id)
    return replace(config, language=language)


# Qwen2-VL's special tokens, in its tokenizer's order (the vision markers and pads the qwen2_vl
# template writes).
QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)


def write_qwen_tokenizer(path: Path, corpus: list[str], specials: tuple[str, ...] = QWEN_SPECIALS) -> Path:
    """A byte-level BPE `tokenizer.json` (Qwen's kind) trained on `corpus`, with `specials` as special
    tokens; returns its path."""
    import tokenizers

    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(specials),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus * 20, trainer)
    backend.save(str(path))
    return path


def write_mp4(path: Path, frames: list[Image.Image], rate: int) -> Path:
    """An mpeg4 video file of `frames` (RGB, all one size) at `rate` frames per second, written with
    PyAV (the "video" extra; callers skip without it); returns its path."""
    import av

    width, height = frames[0].size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    return path
