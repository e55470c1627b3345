"""Data loader throughput: samples per second with image decoding, preprocessing and tokenization.

    python bench/bench_loader.py [--samples 256] [--image-size 336] [--source-size 640x480] \\
        [--workers 0 1 2] [--max-image-tiles 1] [--format jpeg] [--paths fixed native]

Writes a synthetic LLaVA dataset (random-noise photos, so decoding costs what real photos cost, and
conversations of realistic length) and a sentencepiece tokenizer to a temporary directory, then reads
it through the real path: `PositionDataset` (record -> image decode -> pad-to-square/tiles -> CLIP
normalization -> llava_v1 template) and `RankLoader` with each worker count, reporting samples/s and
the speed-up over reading in the training process. `--paths fixed native` also reads the same files
through the native-resolution (Qwen2-VL) path, side by side in the same run: each image resized to
its own 28-multiple size within Qwen2-VL's default pixel range, cut into 14-pixel patches, the
qwen2_vl template and the sample's M-RoPE positions (`megamm.data.native_samples`), and reports its
rate relative to the fixed path's at the same worker count.
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
from megamm.data.native_samples import NativeSampleBuilder, NativeSettings
from megamm.data.samples import ImageSettings, SampleBuilder
from megamm.data.templates import template_tokenizer
from megamm.data.tokenizer import load_tokenizer

# The qwen2_vl template's markers, kept whole by the sentencepiece model (for --paths native).
QWEN_SYMBOLS = "<|im_start|>,<|im_end|>,<|vision_start|>,<|vision_end|>,<|image_pad|>,<|video_pad|>"

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
        input=str(corpus), model_prefix=str(root / "tok"), vocab_size=120, hard_vocab_limit=False,
        user_defined_symbols=f"<image>,<pad>,{QWEN_SYMBOLS}",
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
    parser.add_argument("--paths", nargs="+", choices=("fixed", "native"), default=["fixed"],
                        help="the data paths to read: fixed-size (llava_v1) and / or native-resolution (qwen2_vl)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.source_size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_dataset(root, args.samples, (width, height), args.format)
        tokenizer = load_tokenizer(root / "tok.model")
        patches = (args.image_size // 14) ** 2
        builders = {
            "fixed": SampleBuilder(tokenizer, "llava_v1", ImageSettings(args.image_size, "pad", "clip",
                                                                        args.max_image_tiles),
                                   patches, 4096 * args.max_image_tiles),
            "native": NativeSampleBuilder(template_tokenizer(root / "tok.model", "qwen2_vl"), "qwen2_vl",
                                          NativeSettings(), 16384),
        }
        iterations = args.samples // args.global_batch
        print(f"{args.samples} samples: {args.format} {width}x{height} -> {args.image_size} px "
              f"(max tiles {args.max_image_tiles}), llava_v1 template, global batch {args.global_batch}; "
              "native: Qwen2-VL's processor sizes, qwen2_vl template")
        print(f"{'path':>7} {'workers':>8} {'samples/s':>10} {'speed-up':>9} {'vs fixed':>9}")
        rates: dict[tuple[str, int], float] = {}
        for path in args.paths:
            dataset = PositionDataset(open_source(str(data), str(root / "images")), builders[path], seed=0)
            for workers in args.workers:
                loader = RankLoader(dataset, args.global_batch, 0, 1, 0, iterations, num_workers=workers)
                start = time.perf_counter()
                count = sum(len(samples) for samples in loader)
                rate = rates[path, workers] = count / (time.perf_counter() - start)
                base = rates[path, args.workers[0]]
                fixed = rates.get(("fixed", workers))
                versus = f"{rate / fixed:>8.2f}x" if fixed else f"{'-':>9}"
                print(f"{path:>7} {workers:>8} {rate:>10.1f} {rate / base:>8.2f}x {versus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
