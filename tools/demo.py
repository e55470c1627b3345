"""The demo behind `make demo`: train a small vision-language model on CPU that learns to see.

    python tools/demo.py [--out demo_out] [--quick] [--lora]
    python tools/demo.py --family qwen2-vl [--out demo_out] [--quick]

Every step is an ordinary megamm command, printed before it runs, so it can be copied and changed:

1. `tools/make_shapes_dataset.py`: images of one to three shapes with captions and questions (color,
   shape, count, existence, position, size), LLaVA JSON format, train and held-out splits.
2. `tools/train_tokenizer.py`: a sentencepiece tokenizer on the dataset's text.
3. Training with `torchrun --nproc-per-node 2 -m megamm.train` on packed rows, sharded checkpoints
   after each phase, each phase loading the previous one's at its own layout:
   - phase 0, from scratch, data parallel with the distributed optimizer: vision tower, projector
     and language model trained together on captions and questions (a quarter of the rows drawn
     from the existence questions alone, `questions/exist.json`). There are no pretrained towers
     here; this phase is what a CLIP checkpoint and a pretrained LLaMA give a real LLaVA run.
   - stage 1 (LLaVA pretraining), tensor parallel with sequence parallelism: only the projector
     trains (`--freeze-LM --freeze-ViT`), on captions with the `plain` template.
   - stage 2 (LLaVA instruction tuning), data parallel: projector and language model train, the
     vision tower is frozen (`--freeze-ViT`), on captions and questions with the `mistral` chat
     template, half of the rows from the existence questions.
4. `tools/evaluate_vqa.py` under torchrun (tp=2): generation on the held-out questions, accuracy by
   question type, beside the same model given a blank image (the text-only baseline; both passes in
   one run, `--and-blank-image`).

`--quick` shrinks the dataset and the schedule (the test suite uses it). `--lora` also trains stage
2 with LoRA from the same stage-1 checkpoint (`--pretrained-checkpoint`; rank 8 on every decoder
linear, the projector trained fully, the language model and vision tower frozen; tensor parallel
with sequence parallelism), merges it
(`tools/merge_lora.py merge`) and evaluates it beside the full stage 2.

`--family qwen2-vl` runs the same steps for the native-resolution family
(`examples/demo/qwen2_vl_*.yaml`): the images come in four sizes and aspect ratios (32x32, 64x32,
32x64, 64x64 pixels), each taken at its own size (4, 8, 8 or 16 image tokens), the tokenizer gets the Qwen
chat markers and the one training phase trains tower, patch merger and language model together on
captions and questions with the `qwen2_vl` template. There is no LLaVA stage 1 (its `plain`
template has no vision markers, which this family's M-RoPE positions need); the evaluation and its
blank-image baseline are the same.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megamm.data.qwen_template import IMAGE_PAD, QWEN_SYSTEM, VIDEO_PAD, VISION_END, VISION_START

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo"
MODEL_CONFIG = DEMO / "model.yaml"
TRAINING_CONFIG = DEMO / "training.yaml"
TEMPLATE_MARKERS = "<image>,<pad>,[INST],[/INST]"


@dataclass(frozen=True)
class Schedule:
    """Dataset size and steps per phase; the learning rates are in `phases` (the qwen2-vl family
    trains phase 0 only: its stage steps are 0)."""

    train_images: int
    test_images: int
    phase0_iters: int
    stage1_iters: int = 0
    stage2_iters: int = 0


# `make demo`: the kinds of shape are what the model learns last (at 900 phase-0 steps "shape" was still
# at chance while color and count were learned), so phase 0 gets the steps the 10-minute budget
# allows (2000 took 10.9 minutes in all), on images enough that it sees each about once
# (docs/performance.md, "The demo on CPU").
FULL = Schedule(train_images=12000, test_images=200, phase0_iters=1800, stage1_iters=60, stage2_iters=300)
# The test suite's run: phase 0 as long as counting takes to learn (at 140 steps it was 54% against
# 34% blind, at 200 97%); the stages only need to run (each phase and evaluation starts a torchrun
# of its own, about 10 CPU seconds before the first step).
QUICK = Schedule(train_images=600, test_images=60, phase0_iters=200, stage1_iters=10, stage2_iters=20)
QWEN_FULL = Schedule(train_images=6000, test_images=200, phase0_iters=1500)
QWEN_QUICK = Schedule(train_images=1200, test_images=60, phase0_iters=800)


@dataclass(frozen=True)
class Family:
    """What differs between the demo's model families: the template (whose tokenizer is trained with
    its markers and fixed text), image sizes (`make_shapes_dataset.py --image-size`), schedules and
    the phases' flags (`phases(out, schedule, vocab flags, lora)`)."""

    template: str
    markers: str
    template_text: str
    image_size: str
    full: Schedule
    quick: Schedule
    phases: Callable[[Path, Schedule, list[str], bool], list[tuple[str, list[str]]]]


def run(command: list[str], log: Path | None = None) -> str:
    """Run a command, echoing it and its output (and copying the output to `log`), then its wall time
    and the CPU time of its processes (user + system; the figure to compare across loads of a shared
    machine); fail loudly."""
    print(f"\n$ {shlex.join(command)}", flush=True)
    started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = []
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "OMP_NUM_THREADS" in line or line.startswith(("W1", "*****")) or "*****" in line:
                continue  # torchrun's thread-count notice
            lines.append(line)
            print(line, end="", flush=True)
    output = "".join(lines)
    if log is not None:
        log.write_text(output)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"[{time.perf_counter() - started:.1f} s, CPU {cpu:.1f} s]", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo: the command above failed with exit code {proc.returncode}")
    return output


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *args]


def exist_blend(data: Path, share: float) -> list[str]:
    """--data-path values blending train.json with the existence questions alone, `share` of the rows
    from the latter. "Is there a red shape?" is the one type whose answer neither the question nor the
    image tells alone (only their match does), so it is learned last and from the most examples: at
    train.json's own share (15% of rows) it stayed at chance through phase 0 (docs/performance.md,
    "The demo on CPU")."""
    return [f"{1 - share:g}", str(data / "train.json"), f"{share:g}", str(data / "questions" / "exist.json")]


def phases(out: Path, schedule: Schedule, vocab: list[str], lora: bool = False) -> list[tuple[str, list[str]]]:
    """(name, training flags) of each LLaVA phase, each loading the previous phase's checkpoint. Phase
    0 names the model (`vocab`: its --set flags for the tokenizer's ids); the stages take it from the
    checkpoint they load. `lora`: a LoRA stage 2 too."""
    data, checkpoints = out / "data", out / "checkpoints"
    common = [
        "--config", str(TRAINING_CONFIG), "--image-folder", str(data),
        "--tokenizer-model", str(out / "tokenizer.model"),
    ]
    # Phase 0 and stage 2 (most of the steps) run data parallel: at this size a step's tensor-parallel
    # collectives cost more than they save (docs/performance.md, "The demo on CPU"). Stage 1 and the
    # LoRA stage 2 run tensor parallel, each loading a checkpoint saved at the other layout.
    data_parallel = ["--tensor-model-parallel-size", "1", "--use-distributed-optimizer"]
    tensor_parallel = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    phase0 = [
        "--config", str(MODEL_CONFIG), *vocab, *data_parallel,
        "--data-path", *exist_blend(data, 0.25), "--chat-template", "mistral",
        "--train-iters", str(schedule.phase0_iters), "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "20",
        "--vision-lr", "1e-4",
        "--save", str(checkpoints / "phase0"),
    ]
    stage1 = [
        *tensor_parallel, "--data-path", str(data / "captions.json"), "--chat-template", "plain",
        "--freeze-LM", "--freeze-ViT",
        "--train-iters", str(schedule.stage1_iters), "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "5",
        "--load", str(checkpoints / "phase0"), "--finetune", "--save", str(checkpoints / "stage1"),
    ]
    stage2 = [
        *data_parallel, "--data-path", *exist_blend(data, 0.5), "--chat-template", "mistral", "--freeze-ViT",
        "--train-iters", str(schedule.stage2_iters), "--lr", "5e-4", "--min-lr", "2e-5", "--lr-warmup-iters", "10",
        "--load", str(checkpoints / "stage1"), "--finetune", "--save", str(checkpoints / "stage2"),
    ]
    named = [("phase0", phase0), ("stage1", stage1), ("stage2", stage2)]
    if lora:
        named.append(("stage2_lora", [
            *tensor_parallel, "--data-path", *exist_blend(data, 0.5), "--chat-template", "mistral", "--freeze-ViT",
            "--lora-rank", "8", "--lora-alpha", "16",
            "--train-iters", str(schedule.stage2_iters), "--lr", "2e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "10",
            "--pretrained-checkpoint", str(checkpoints / "stage1"), "--save", str(checkpoints / "stage2_lora"),
        ]))
    return [(name, [*common, *flags, "--tensorboard-dir", str(out / "tensorboard" / name)]) for name, flags in named]


def qwen2_vl_phases(out: Path, schedule: Schedule, vocab: list[str], lora: bool = False) -> list[tuple[str, list[str]]]:
    """The qwen2-vl family's one phase: tower, merger and language model from scratch together on
    captions and questions, tensor parallel with sequence parallelism and packed rows. It has no
    stage 2 to train with LoRA (`lora`: SystemExit)."""
    if lora:
        raise SystemExit("demo: --lora trains a LoRA stage 2, which the qwen2-vl demo does not have")
    data = out / "data"
    return [("phase0", [
        "--config", str(DEMO / "qwen2_vl_training.yaml"), "--config", str(DEMO / "qwen2_vl_model.yaml"), *vocab,
        "--tensor-model-parallel-size", "2", "--sequence-parallel",
        "--image-folder", str(data), "--tokenizer-model", str(out / "tokenizer.model"),
        "--data-path", str(data / "train.json"),
        # Trained from scratch on captions and questions together at lr 2e-3, the model stopped looking
        # at the images by step ~100 (the gap between real and blank images closed, docs/models.md);
        # at lr 5e-4 with the tower at 1e-4 the gap keeps growing through the schedule.
        "--train-iters", str(schedule.phase0_iters), "--lr", "5e-4", "--min-lr", "5e-5", "--vision-lr", "1e-4",
        "--lr-warmup-iters", "20",
        "--save", str(out / "checkpoints" / "phase0"), "--tensorboard-dir", str(out / "tensorboard" / "phase0"),
    ])]


FAMILIES = {
    "llava": Family("mistral", TEMPLATE_MARKERS, "", "32", FULL, QUICK, phases),
    "qwen2-vl": Family(
        "qwen2_vl", f"{IMAGE_PAD},<pad>,<|im_start|>,<|im_end|>,{VISION_START},{VISION_END},{VIDEO_PAD}",
        QWEN_SYSTEM, "32,64x32,32x64,64", QWEN_FULL, QWEN_QUICK, qwen2_vl_phases,
    ),
}


def vocabulary(tokenizer: Path, template: str) -> list[str]:
    """The --set flags that give the model the tokenizer's size and image (and video) token ids, the
    tokenizer loaded as training loads it for `template`."""
    from megamm.data.qwen_template import VIDEO_PAD
    from megamm.data.templates import template_tokenizer

    loaded = template_tokenizer(tokenizer, template)
    values = {"vocab_size": loaded.vocab_size, "image_token_id": loaded.image_token_id}
    if loaded.has_token(VIDEO_PAD):
        values["video_token_id"] = loaded.token_id(VIDEO_PAD)
    return [flag for name, value in values.items() for flag in ("--set", f"model.language.{name}={value}")]


def evaluate(out: Path, model: str, blank: bool = False) -> list[dict]:
    """evaluate_vqa.py's scores of checkpoint `model` (under out/checkpoints) on the held-out questions:
    with the images, then (`blank`) with blank images, both passes in one run."""
    command = torchrun(
        str(ROOT / "tools" / "evaluate_vqa.py"), "--load", str(out / "checkpoints" / model),
        "--tensor-model-parallel-size", "2", "--questions", str(out / "data" / "test.json"),
        "--image-root", str(out / "data"), "--batch-size", "64", "--json",
        "--predictions", str(out / f"predictions_{model}.jsonl"),
    ) + (["--and-blank-image"] if blank else [])
    output = run(command, out / "logs" / f"eval_{model}.log")
    scores = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return scores[-(2 if blank else 1):]


def majority_baselines(test_file: Path) -> dict[str, float]:
    """Per type, the accuracy of always answering the most common test answer."""
    counts: dict[str, dict[str, int]] = {}
    for row in json.loads(test_file.read_text()):
        answers = counts.setdefault(row["question_type"], {})
        answer = row["conversations"][-1]["value"]
        answers[answer] = answers.get(answer, 0) + 1
    return {kind: max(a.values()) / sum(a.values()) for kind, a in counts.items()}


def report(seeing: dict, blank: dict, majority: dict[str, float], lora: dict | None = None) -> str:
    """The results table from evaluate_vqa.py's --json scores: accuracy by type, then "overall"
    (with `lora`, the merged LoRA stage 2's column after the full stage 2's)."""
    columns = [("with image", seeing), *([("LoRA", lora)] if lora else []), ("blank image", blank)]
    rows = [f"{'question type':<14} " + " ".join(f"{name:>11}" for name, _ in columns) + f" {'majority':>9}"]
    for kind in sorted(seeing["by_type"]):
        rows.append(f"{kind:<14} " + " ".join(f"{100 * scores['by_type'][kind]['accuracy']:>10.1f}%"
                                              for _, scores in columns) + f" {100 * majority[kind]:>8.1f}%")
    rows.append(f"{'overall':<14} " + " ".join(f"{100 * scores['accuracy']:>10.1f}%" for _, scores in columns))
    if seeing["errors"] or blank["errors"]:
        rows.append(f"(not scored, image errors: {seeing['errors']} with image, {blank['errors']} blank)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "demo_out", help="where data, checkpoints and logs go")
    parser.add_argument("--quick", action="store_true", help="a small dataset and short schedule (tests)")
    parser.add_argument("--lora", action="store_true", help="also a LoRA stage 2, merged and evaluated beside it")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llava",
                        help="llava: a CLIP-style tower on 32x32 images; qwen2-vl: a native-resolution tower on "
                        "images of four sizes")
    args = parser.parse_args(argv)
    family = FAMILIES[args.family]
    schedule = family.quick if args.quick else family.full
    out = args.out.resolve()
    if (out / "checkpoints").exists():
        raise SystemExit(f"demo: {out / 'checkpoints'} exists; remove {out} or pass another --out")
    family.phases(out, schedule, [], args.lora)  # a refused combination stops before anything runs
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not (out / "data" / "train.json").exists():
        run([sys.executable, str(ROOT / "tools" / "make_shapes_dataset.py"), "--out", str(out / "data"),
             "--train-images", str(schedule.train_images), "--test-images", str(schedule.test_images),
             "--image-size", family.image_size], out / "logs" / "dataset.log")
    inputs = [str(out / "data" / "text.txt")]
    if family.template_text:  # the template's fixed text (Qwen's default system prompt) is tokenizer text too
        (out / "template.txt").write_text(family.template_text + "\n")
        inputs.append(str(out / "template.txt"))
    run([sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--input", *inputs,
         "--model-prefix", str(out / "tokenizer"), "--vocab-size", "128",
         "--user-defined-symbols", family.markers], out / "logs" / "tokenizer.log")
    vocab = vocabulary(out / "tokenizer.model", family.template)
    named_phases = family.phases(out, schedule, vocab, args.lora)
    for name, flags in named_phases:
        run(torchrun("-m", "megamm.train", *flags), out / "logs" / f"{name}.log")
    final = named_phases[-1][0] if not args.lora else "stage2"
    seeing, blank = evaluate(out, final, blank=True)
    results = {"with_image": seeing, "blank_image": blank}
    if args.lora:
        run([sys.executable, str(ROOT / "tools" / "merge_lora.py"), "merge", "--load",
             str(out / "checkpoints" / "stage2_lora"), "--save", str(out / "checkpoints" / "stage2_lora_merged")],
            out / "logs" / "merge_lora.log")
        results["lora_with_image"] = evaluate(out, "stage2_lora_merged")[0]
    table = report(seeing, blank, majority_baselines(out / "data" / "test.json"), results.get("lora_with_image"))
    (out / "results.txt").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    minutes = (time.perf_counter() - started) / 60
    print(f"\nHeld-out accuracy (exact match, greedy generation), {final} model:\n{table}")
    print(f"\ndemo finished in {minutes:.1f} min")
    print(f"  checkpoints: {out / 'checkpoints'} ({', '.join(name for name, _ in named_phases)})")
    print(f"  logs:        {out / 'logs'}   TensorBoard: {out / 'tensorboard'}")
    print(f"  ask it:      .venv/bin/python tools/generate.py --load {out / 'checkpoints' / final} "
          f"--image {out / 'data' / 'images' / 'test_0.png'} --prompt 'How many shapes are there?'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
