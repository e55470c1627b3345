"""Balanced vision work (--balance-vision-work) on a skewed dataset at dp=2 on CPU: step time and the
vision / text imbalance over dp ranks, with and without balancing, side by side in one run.

    python bench/bench_balance.py [--iters 15] [--repeats 2] [--samples 96]

Writes a LLaVA dataset whose images tile very differently (--max-image-tiles 9 with 32 px tiles:
a quarter of the samples are 256x256 photos, 3x3 tiles + thumbnail = 10 tower inputs; half are
32x32, 1 input; a quarter are text-only) and a sentencepiece tokenizer, then trains the tiny CPU
example with a wider, deeper vision tower (so the tower dominates a tiled sample, as it does for
InternVL-style models) under `torchrun --nproc-per-node 2`, alternating the two settings
`--repeats` times. Reported per setting (medians over the log lines after the first, which holds
the warm-up): the step time, the busy time of the slowest and the fastest rank (the straggler
line), and max / mean over ranks of the vision and text tokens (the balanced run's log states the
contiguous split's figures for the same batches, which is what the plain run trains on). Then the
cost of the probe that weighs a sample (record + image header + tokenization) against building it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from megamm.data.datasets import open_source
from megamm.data.loader import PositionDataset
from megamm.data.samples import ImageSettings, SampleBuilder
from megamm.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the", "image", "shows", "a", "red", "car", "next", "to", "tall", "building", "people", "walk",
         "street", "sky", "with", "trees", "and", "dog", "what", "color", "is", "it", "how", "many")
TILE = 32
MAX_TILES = 9
SEQ = 256
# A vision tower that dominates a tiled sample: 17 tokens per tile, 8 layers of width 256.
MODEL = ["--set", "model.vision.transformer.hidden_size=256", "--set", "model.vision.transformer.num_layers=8",
         "--set", "model.vision.transformer.ffn_hidden_size=1024", "--set", "model.vision.select_layer=-1"]
STEP = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+)")
SPREAD = re.compile(r"step time spread: max ([0-9.]+) s \(rank \d+\) / min ([0-9.]+) s")
IMBALANCE = re.compile(r"dp max/mean vision tokens: ([0-9.]+) \(contiguous ([0-9.]+)\), "
                       r"text tokens: ([0-9.]+) \(contiguous ([0-9.]+)\)")


def write_dataset(root: Path, samples: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """(the JSON file, the image folder, the tokenizer) of a dataset skewed in tiles per sample."""
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    images = root / "images"
    images.mkdir()
    rows = []
    for index in range(samples):
        kind = index % 4
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40))) + "."
        row: dict = {"id": str(index), "conversations": [
            {"from": "human", "value": (f"<image>\n{question}?" if kind != 3 else f"{question}?")},
            {"from": "gpt", "value": answer}]}
        if kind != 3:
            side = 256 if kind == 0 else 32
            Image.fromarray(noise.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(images / f"{index}.jpg")
            row["image"] = f"{index}.jpg"
        rows.append(row)
    (root / "data.json").write_text(json.dumps(rows))
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(300)))
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "tok"), vocab_size=60, hard_vocab_limit=False,
        user_defined_symbols="<image>,<pad>", num_threads=1, minloglevel=2,
    )
    return root / "data.json", images, root / "tok.model"


def train(data: Path, images: Path, tokenizer: Path, iters: int, balance: bool) -> str:
    tok = load_tokenizer(tokenizer)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megamm.train",
        "--config", str(ROOT / "examples" / "tiny_cpu.yaml"), *MODEL, "--no-mock-data", "--data-path", str(data),
        "--image-folder", str(images), "--tokenizer-model", str(tokenizer), "--chat-template", "llava_v1",
        "--set", f"model.language.vocab_size={tok.vocab_size}", "--set", f"model.language.image_token_id={tok.image_token_id}",
        "--max-image-tiles", str(MAX_TILES), "--seq-length", str(SEQ), "--micro-batch-size", "2",
        "--global-batch-size", "16", "--train-iters", str(iters), "--log-interval", "5", "--eval-iters", "0",
        "--lr-warmup-iters", "1", "--num-workers", "1", "--straggler-threshold", "1.0",
        *(["--balance-vision-work"] if balance else []),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return done.stdout


def probe_cost(data: Path, images: Path, tokenizer: Path, count: int) -> tuple[float, float]:
    """Seconds per sample to probe and to build (decode, tile, normalize, tokenize), in this process."""
    builder = SampleBuilder(load_tokenizer(tokenizer), "llava_v1", ImageSettings(TILE, max_tiles=MAX_TILES), 16, SEQ)
    dataset = PositionDataset(open_source(str(data), str(images)), builder, seed=0)
    start = time.perf_counter()
    for position in range(count):
        dataset.probe(position)
    probe = (time.perf_counter() - start) / count
    start = time.perf_counter()
    for position in range(count):
        dataset[position]
    return probe, (time.perf_counter() - start) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--samples", type=int, default=96)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_dataset(Path(tmp), args.samples)
        runs: dict[bool, list[str]] = {False: [], True: []}
        for _ in range(args.repeats):
            for balance in (False, True):
                runs[balance].append(train(*files, args.iters, balance))
        probe, build = probe_cost(*files, args.samples)

    def after_warmup(pattern: re.Pattern, logs: list[str]) -> list[tuple[float, ...]]:
        return [tuple(map(float, m.groups())) for log in logs for m in list(pattern.finditer(log))[1:]]

    imbalance = after_warmup(IMBALANCE, runs[True])
    print(f"dp=2, global batch 16 (microbatches of 2), {args.iters} steps x {args.repeats} runs per setting, "
          f"seq {SEQ}, max {MAX_TILES} tiles of {TILE} px")
    print(f"{'setting':>12} {'step ms':>9} {'slowest busy s':>15} {'fastest busy s':>15} "
          f"{'vision max/mean':>16} {'text max/mean':>14}")
    for balance, name in ((False, "contiguous"), (True, "balanced")):
        step = statistics.median(s for (s,) in after_warmup(STEP, runs[balance]))
        spread = after_warmup(SPREAD, runs[balance])
        slowest = statistics.median(s[0] for s in spread) if spread else float("nan")
        fastest = statistics.median(s[1] for s in spread) if spread else float("nan")
        vision = statistics.median(i[1 if not balance else 0] for i in imbalance)
        text = statistics.median(i[3 if not balance else 2] for i in imbalance)
        print(f"{name:>12} {step:>9.1f} {slowest:>15.3f} {fastest:>15.3f} {vision:>16.3f} {text:>14.3f}")
    print(f"probe {1e3 * probe:.2f} ms/sample vs build {1e3 * build:.2f} ms/sample "
          f"({100 * probe / build:.1f}% of a build; every rank probes the whole global batch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
