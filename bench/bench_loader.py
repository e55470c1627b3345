"""Data loader throughput: samples per second with image decoding, preprocessing and tokenization.

    python bench/bench_loader.py [--samples 256] [--image-size 336] [--source-size 640x480] \\
        [--workers 0 1 2] [--max-image-tiles 1] [--format jpeg]

Writes a synthetic LLaVA dataset (random-noise photos, so decoding costs what real photos cost, and
conversations of realistic length) and a sentencepiece tokenizer to a temporary directory, then reads
it through the real path: `PositionDataset` (record -> image decode -> pad-to-square/tiles -> CLIP
normalization -> llava_v1 template) and `RankLoader` with each worker count, reporting samples/s and
the speed-up over reading in the training process.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from megamm.data.datasets import open_source
from megamm.data.loader import PositionDataset, RankLoader
from megamm.data.samples import ImageSettings, SampleBuilder
from megamm.data.tokenizer import load_tokenizer

WORDS = (
    "the", "image", "shows", "a", "small", "red", "car", "parked", "next", "to", "tall", "building", "while",
    "people", "walk", "along", "street", "under", "cloudy", "sky", "with", "trees", "and", "dog", "near",
    "corner", "what", "color", "is", "it", "how", "many", "are", "there", "describe", "scene", "in", "detail",
)


def write_dataset(root: Path, samples: int, size: tuple[int, int], image_format: str, seed: int = 0) -> Path:
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir()
    rows = []
    suffix = "jpg" if image_format == "jpeg" else "png"
    for index in range(samples):
        name = f"{index}.{suffix}"
        pixels = noise.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name, format=image_format.upper())
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))
        rows.append({"id": str(index), "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{question}?"}, {"from": "gpt", "value": answer + "."}]})
    (root / "data.json").write_text(json.dumps(rows))
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(500)))
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "tok"), vocab_size=120, hard_vocab_limit=False, user_defined_symbols="<image>,<pad>",
        num_threads=1, minloglevel=2,
    )
    return root / "data.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--source-size", default="640x480", help="WxH of the stored images")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-image-tiles", type=int, default=1)
    parser.add_argument("--format", choices=("jpeg", "png"), default="jpeg")
    parser.add_argument("--global-batch", type=int, default=16)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.source_size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_dataset(root, args.samples, (width, height), args.format)
        tokenizer = load_tokenizer(root / "tok.model")
        patches = (args.image_size // 14) ** 2
        builder = SampleBuilder(tokenizer, "llava_v1", ImageSettings(args.image_size, "pad", "clip", args.max_image_tiles),
                                patches, 4096 * args.max_image_tiles)
        dataset = PositionDataset(open_source(str(data), str(root / "images")), builder, seed=0)
        iterations = args.samples // args.global_batch
        print(f"{args.samples} samples: {args.format} {width}x{height} -> {args.image_size} px "
              f"(max tiles {args.max_image_tiles}), llava_v1 template, global batch {args.global_batch}")
        print(f"{'workers':>8} {'samples/s':>10} {'speed-up':>9}")
        base = None
        for workers in args.workers:
            loader = RankLoader(dataset, args.global_batch, 0, 1, 0, iterations, num_workers=workers)
            start = time.perf_counter()
            count = sum(len(samples) for samples in loader)
            rate = count / (time.perf_counter() - start)
            base = base or rate
            print(f"{workers:>8} {rate:>10.1f} {rate / base:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
