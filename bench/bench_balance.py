"""Balanced vision work (--balance-vision-work) on a skewed dataset at dp=2 on CPU: step time and the
vision / text imbalance over dp ranks, with and without balancing, side by side in one run.

    python bench/bench_balance.py [--dataset tiled|native] [--steps 12] [--iters 15] [--repeats 1]
        [--samples 96] [--global-batch 8]

`--dataset tiled` (the default) writes a LLaVA dataset whose images tile very differently
(--max-image-tiles 9 with 32 px tiles: one sample in 8 is a 256x256 photo, 3x3 tiles + thumbnail = 10
tower inputs; the others are 32x32, 1 input, or (one in 4) text-only) and a sentencepiece tokenizer.
The model is the tiny CPU example with a wider, deeper vision tower (so the tower dominates a tiled
sample, as it does for InternVL-style models). `--dataset native` writes the same skew for a
native-resolution (Qwen2-VL family) tower: one sample in 8 a 96x96 image (576 patches of 4 px), one a
frame-list video (8 frames of 48x48 at 4 per second: 4 sampled, 2 x 144 patches), two text-only, the
others 24x24 images (36 patches); the model is examples/qwen2_vl_tiny_cpu.yaml with a wider, deeper
tower. Two measurements:

1. Critical path, in this process on one thread: for each of `--steps` global batches, the
   forward + backward of each dp rank's microbatches is timed rank after rank, for the contiguous
   and the balanced split of the same batch; a synchronous dp step takes as long as its slowest
   rank, so max over ranks is the step's compute time. One process measures both splits of each
   batch back to back (alternating which goes first), which keeps a shared machine's load out of
   the ratio.
2. End to end, `torchrun --nproc-per-node 2 -m megamm.train` with and without the flag, alternated
   `--repeats` times: the log's step time, the slowest and fastest rank's busy time, and max / mean
   vision and text tokens (medians over the log lines after the first, which holds the warm-up).
   Two ranks on two shared cores make these noisy.

Then the cost of the probe that weighs a sample (record + image headers + tokenization) against
building it (decode, tile or patch, normalize, tokenize).
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
import torch
from PIL import Image

from megamm.config.resolved import ResolvedConfig
from megamm.data.balance import Imbalance, contiguous_split, sample_cost
from megamm.data.batching import padded_batch
from megamm.data.datasets import build_source
from megamm.data.loader import PositionDataset
from megamm.data.samples import Sample
from megamm.data.templates import template_tokenizer
from megamm.data.tokenizer import load_tokenizer
from megamm.models.llava import LlavaModel
from megamm.parallel.state import ParallelState
from megamm.train import read_config
from megamm.training.data import build_sample_builder, vision_input_shape, vision_work_balancer

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the", "image", "shows", "a", "red", "car", "next", "to", "tall", "building", "people", "walk",
         "street", "sky", "with", "trees", "and", "dog", "what", "color", "is", "it", "how", "many")
TILE = 32
MAX_TILES = 9
SEQ = 384  # the llava_v1 system prompt + 10 tiles x 16 tokens end near token 304
NATIVE_SEQ = 256  # the qwen2_vl system prompt + a 96x96 image's 144 tokens end near token 200
# The qwen2_vl template's markers, kept whole by the sentencepiece model (--dataset native).
QWEN_SYMBOLS = "<|im_start|>,<|im_end|>,<|vision_start|>,<|vision_end|>,<|image_pad|>,<|video_pad|>"
# A vision tower that dominates a tiled sample: 17 tokens per tile, 12 layers of width 384 (about
# 0.36 GFLOP forward per tile against 0.86 for a padded language row of 384 tokens).
MODEL = ["--set", "model.vision.transformer.hidden_size=384", "--set", "model.vision.transformer.num_layers=12",
         "--set", "model.vision.transformer.num_attention_heads=6",
         "--set", "model.vision.transformer.ffn_hidden_size=1536", "--set", "model.vision.select_layer=-1"]
# A native-resolution tower that dominates a large image: width 256, 6 layers (about 6 GFLOP forward
# for a 96x96 image's 576 patches against 0.3 for a 24x24 one and 0.3 for the padded language row).
NATIVE_MODEL = ["--set", "model.vision.transformer.hidden_size=256", "--set", "model.vision.transformer.num_layers=6",
                "--set", "model.vision.transformer.ffn_hidden_size=1024"]
# The images at their own size (sides already multiples of patch 4 x merge 2), the video's 48x48 frames too.
NATIVE_PIXELS = ["--min-pixels", "64", "--max-pixels", "16384", "--video-min-pixels", "64",
                 "--video-max-pixels", "4096"]
STEP = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+)")
SPREAD = re.compile(r"step time spread: max ([0-9.]+) s \(rank \d+\) / min ([0-9.]+) s")
IMBALANCE = re.compile(r"dp max/mean vision tokens: ([0-9.]+) \(contiguous ([0-9.]+)\), "
                       r"text tokens: ([0-9.]+) \(contiguous ([0-9.]+)\)")


def _noise(noise: np.random.Generator, side: int) -> Image.Image:
    return Image.fromarray(noise.integers(0, 256, (side, side, 3), dtype=np.uint8))


def write_dataset(root: Path, samples: int, native: bool, seed: int = 0) -> tuple[Path, Path, Path]:
    """(the JSON file, the image folder, the tokenizer) of a dataset skewed in vision work per sample
    (the module docstring: tiles, or native-resolution images and a video)."""
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    images = root / "images"
    images.mkdir()
    rows = []
    for index in range(samples):
        kind = index % 8
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40))) + "."
        row: dict = {"id": str(index), "conversations": [{"from": "human", "value": f"{question}?"},
                                                         {"from": "gpt", "value": answer}]}
        if native and kind == 4:
            frames = [f"{index}_{frame}.jpg" for frame in range(8)]
            for frame in frames:
                _noise(noise, 48).save(images / frame)
            row.update(video=frames, frame_rate=4)
            row["conversations"][0]["value"] = f"<video>\n{question}?"
        elif kind % 4 != 3:
            side = (96 if kind == 0 else 24) if native else (256 if kind == 0 else 32)
            _noise(noise, side).save(images / f"{index}.jpg")
            row["image"] = f"{index}.jpg"
            row["conversations"][0]["value"] = f"<image>\n{question}?"
        rows.append(row)
    (root / "data.json").write_text(json.dumps(rows))
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(300)))
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "tok"), vocab_size=60, hard_vocab_limit=False,
        user_defined_symbols="<image>,<pad>" + (f",{QWEN_SYMBOLS}" if native else ""), num_threads=1, minloglevel=2,
    )
    return root / "data.json", images, root / "tok.model"


def train(flags: list[str], iters: int, balance: bool) -> str:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megamm.train", *flags,
        "--train-iters", str(iters), "--log-interval", "5", "--num-workers", "1", "--straggler-threshold", "1.0",
        *(["--balance-vision-work"] if balance else []),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return done.stdout


def _flags(data: Path, images: Path, tokenizer: Path, global_batch: int, native: bool) -> list[str]:
    common = ["--no-mock-data", "--data-path", str(data), "--image-folder", str(images), "--tokenizer-model",
              str(tokenizer), "--micro-batch-size", "1", "--global-batch-size", str(global_batch), "--eval-iters", "0",
              "--lr-warmup-iters", "1"]
    if native:
        tok = template_tokenizer(tokenizer, "qwen2_vl")
        return [
            "--config", str(ROOT / "examples" / "qwen2_vl_tiny_cpu.yaml"), *NATIVE_MODEL, *common,
            "--chat-template", "qwen2_vl", "--set", f"model.language.vocab_size={tok.vocab_size}",
            "--set", f"model.language.image_token_id={tok.image_token_id}",
            "--set", f"model.language.video_token_id={tok.token_id('<|video_pad|>')}",
            "--seq-length", str(NATIVE_SEQ), *NATIVE_PIXELS,
        ]
    tok = load_tokenizer(tokenizer)
    return [
        "--config", str(ROOT / "examples" / "tiny_cpu.yaml"), *MODEL, *common, "--chat-template", "llava_v1",
        "--set", f"model.language.vocab_size={tok.vocab_size}", "--set", f"model.language.image_token_id={tok.image_token_id}",
        "--max-image-tiles", str(MAX_TILES), "--seq-length", str(SEQ),
    ]


def _rank_seconds(model: LlavaModel, samples: list[Sample], pad_id: int, seq: int, image_shape: tuple[int, ...]) -> float:
    """Forward + backward of one rank's microbatches (of 1 sample), as the training step runs them."""
    start = time.perf_counter()
    for sample in samples:
        output = model(**padded_batch([sample], seq, pad_id, image_shape))
        output["loss"].sum().backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def critical_paths(flags: list[str], steps: int, global_batch: int) -> dict[str, list[tuple[float, float, Imbalance]]]:
    """Per split, for each global batch: (max over the 2 ranks of their compute seconds, max over
    the ranks of their FLOPs as --balance-vision-work weighs them, the imbalance)."""
    torch.set_num_threads(1)
    config = read_config([*flags, "--balance-vision-work", "--train-iters", str(steps)], 1)
    t = config.training
    state = ParallelState.single()
    state.seed(t.seed)
    model = LlavaModel(config.model, state)
    model.initialize(t.seed)
    builder, balancer = build_sample_builder(config), vision_work_balancer(config)
    source, _ = build_source(t.data_path, t.image_folder, t.seed, steps * global_batch)
    dataset = PositionDataset(source, builder, t.seed)
    image_shape = vision_input_shape(config)
    paths: dict[str, list[tuple[float, float, Imbalance]]] = {"contiguous": [], "balanced": []}
    for step in range(steps + 1):  # the first batch warms up
        first = step * global_batch
        plan = balancer.plan(first, global_batch, 2, dataset.probe)
        contiguous = [[[first + i for i in mb] for mb in rank] for rank in contiguous_split(global_batch, 2, 1)]
        splits = [("contiguous", contiguous, plan.contiguous), ("balanced", plan.positions, plan.imbalance)]
        # Alternate which split runs first, so a drift in the machine's load cancels.
        for name, positions, imbalance in splits[:: 1 if step % 2 else -1]:
            ranks = [[dataset[p].sample for mb in rank for p in mb] for rank in positions]
            seconds = max(_rank_seconds(model, samples, builder.tokenizer.pad_id, t.seq_length, image_shape)
                          for samples in ranks)
            flops = max(sum(balancer.weigh(sample_cost(dataset.probe(p), balancer.tower_tokens)) for mb in rank for p in mb)
                        for rank in positions)
            if step:
                paths[name].append((seconds, flops, imbalance))
    return paths


def probe_cost(config: ResolvedConfig, count: int) -> tuple[float, float]:
    """Seconds per sample to probe and to build (decode, tile or patch, normalize, tokenize), in this process."""
    t = config.training
    source, _ = build_source(t.data_path, t.image_folder, t.seed, count)
    dataset = PositionDataset(source, build_sample_builder(config), seed=0)
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
    parser.add_argument("--dataset", choices=("tiled", "native"), default="tiled",
                        help="tiles of a fixed-size tower, or native-resolution images and videos (Qwen2-VL family)")
    parser.add_argument("--steps", type=int, default=12, help="global batches timed in this process")
    parser.add_argument("--iters", type=int, default=15, help="steps of each torchrun run (0: skip them)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--global-batch", type=int, default=8, help="samples per step (microbatches of 1)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        native = args.dataset == "native"
        flags = _flags(*write_dataset(Path(tmp), args.samples, native), args.global_batch, native)
        paths = critical_paths(flags, args.steps, args.global_batch)
        runs: dict[bool, list[str]] = {False: [], True: []}
        for _ in range(args.repeats if args.iters else 0):
            for balance in (False, True):
                runs[balance].append(train(flags, args.iters, balance))
        probe, build = probe_cost(read_config(flags, 1), args.samples)
    shape = ("native-resolution images of 96x96 / 24x24 px and 8-frame videos" if native
             else f"max {MAX_TILES} tiles of {TILE} px")
    print(f"dp=2, global batch {args.global_batch} (microbatches of 1), seq {NATIVE_SEQ if native else SEQ}, {shape}")
    print(f"critical path over {args.steps} global batches (one process, one thread; median):")
    print(f"{'split':>12} {'max-rank ms':>12} {'max-rank GFLOP':>15} {'vision max/mean':>16} {'text max/mean':>14}")
    for name, rows in paths.items():
        seconds = statistics.median(r[0] for r in rows)
        flops = statistics.median(r[1] for r in rows)
        vision = statistics.median(r[2].vision for r in rows)
        text = statistics.median(r[2].text for r in rows)
        print(f"{name:>12} {1e3 * seconds:>12.1f} {flops / 1e9:>15.2f} {vision:>16.3f} {text:>14.3f}")
    pairs = list(zip(paths["balanced"], paths["contiguous"]))
    total = [sum(r[k] for r in rows) for rows in (paths["balanced"], paths["contiguous"]) for k in (0, 1)]
    print(f"balanced / contiguous, max-rank time: median of per-batch ratios "
          f"{statistics.median(b[0] / c[0] for b, c in pairs):.3f}, total {total[0] / total[2]:.3f}; "
          f"max-rank FLOPs: total {total[1] / total[3]:.3f}")
    if runs[False]:
        def after_warmup(pattern: re.Pattern, logs: list[str]) -> list[tuple[float, ...]]:
            return [tuple(map(float, m.groups())) for log in logs for m in list(pattern.finditer(log))[1:]]

        imbalance = after_warmup(IMBALANCE, runs[True])
        print(f"torchrun dp=2, {args.iters} steps x {args.repeats} run(s) per setting (medians):")
        print(f"{'setting':>12} {'step ms':>9} {'slowest busy s':>15} {'fastest busy s':>15} "
              f"{'vision max/mean':>16} {'text max/mean':>14}")
        for balance, name in ((False, "contiguous"), (True, "balanced")):
            step = statistics.median(s for (s,) in after_warmup(STEP, runs[balance]))
            spread = after_warmup(SPREAD, runs[balance])
            slowest = statistics.median(s[0] for s in spread) if spread else float("nan")
            fastest = statistics.median(s[1] for s in spread) if spread else float("nan")
            vision = statistics.median(i[0 if balance else 1] for i in imbalance)
            text = statistics.median(i[2 if balance else 3] for i in imbalance)
            print(f"{name:>12} {step:>9.1f} {slowest:>15.3f} {fastest:>15.3f} {vision:>16.3f} {text:>14.3f}")
    print(f"probe {1e3 * probe:.2f} ms/sample vs build {1e3 * build:.2f} ms/sample "
          f"({100 * probe / build:.1f}% of a build; every rank probes the whole global batch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
