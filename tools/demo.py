"""The demo behind `make demo`: train a small vision-language model on CPU that learns to see.

    python tools/demo.py [--out demo_out] [--quick]

Every step is an ordinary megamm command, printed before it runs, so it can be copied and changed:

1. `tools/make_shapes_dataset.py`: images of one to three shapes with captions and questions (color,
   shape, count, existence, position, size), LLaVA JSON format, train and held-out splits.
2. `tools/train_tokenizer.py`: a sentencepiece tokenizer on the dataset's text.
3. Training with `torchrun --nproc-per-node 2 -m megamm.train`, tensor parallel over both processes
   (with sequence parallelism and packed rows), sharded checkpoints after each phase:
   - phase 0, from scratch: vision tower, projector and language model trained together on captions
     and questions. There are no pretrained towers here; this phase is what a CLIP checkpoint and a
     pretrained LLaMA give a real LLaVA run.
   - stage 1 (LLaVA pretraining): only the projector trains (`--freeze-LM --freeze-ViT`), on
     captions with the `plain` template.
   - stage 2 (LLaVA instruction tuning): projector and language model train, the vision tower is
     frozen (`--freeze-ViT`), on the questions with the `mistral` chat template.
4. `tools/evaluate_vqa.py` under torchrun (tp=2): generation on the held-out questions, accuracy by
   question type, beside the same model given a blank image (the text-only baseline).

`--quick` shrinks the dataset and the schedule (the test suite uses it). `--lora` also trains stage
2 with LoRA from the same stage-1 checkpoint (`--pretrained-checkpoint`; rank 8 on every decoder
linear, the projector trained fully, the language model and vision tower frozen), merges it
(`tools/merge_lora.py merge`) and evaluates it beside the full stage 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIG = ROOT / "examples" / "demo" / "model.yaml"
TRAINING_CONFIG = ROOT / "examples" / "demo" / "training.yaml"
TEMPLATE_MARKERS = "<image>,<pad>,[INST],[/INST]"


@dataclass(frozen=True)
class Schedule:
    """Dataset size and steps per phase; the learning rates are in `phases`."""

    train_images: int
    test_images: int
    phase0_iters: int
    stage1_iters: int
    stage2_iters: int


FULL = Schedule(train_images=6000, test_images=200, phase0_iters=1800, stage1_iters=60, stage2_iters=300)
QUICK = Schedule(train_images=600, test_images=60, phase0_iters=200, stage1_iters=10, stage2_iters=40)


def run(command: list[str], log: Path | None = None) -> str:
    """Run a command, echoing it and its output (and copying the output to `log`); fail loudly."""
    print(f"\n$ {shlex.join(command)}", flush=True)
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
    if proc.returncode != 0:
        raise SystemExit(f"demo: the command above failed with exit code {proc.returncode}")
    return output


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *args]


def phases(out: Path, schedule: Schedule, vocab: dict[str, int], lora: bool = False) -> list[tuple[str, list[str]]]:
    """(name, training flags) of each phase, each loading the previous phase's checkpoint. Phase 0
    names the model; the stages take it from the checkpoint they load. `lora`: a LoRA stage 2 too."""
    data, checkpoints = out / "data", out / "checkpoints"
    common = [
        "--config", str(TRAINING_CONFIG), "--tensor-model-parallel-size", "2", "--sequence-parallel",
        "--image-folder", str(data), "--tokenizer-model", str(out / "tokenizer.model"),
    ]
    phase0 = [
        "--config", str(MODEL_CONFIG),
        "--set", f"model.language.vocab_size={vocab['vocab_size']}",
        "--set", f"model.language.image_token_id={vocab['image_token_id']}",
        "--data-path", str(data / "train.json"), "--chat-template", "mistral",
        "--train-iters", str(schedule.phase0_iters), "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "20",
        "--vision-lr", "1e-4",
        "--save", str(checkpoints / "phase0"),
    ]
    stage1 = [
        "--data-path", str(data / "captions.json"), "--chat-template", "plain", "--freeze-LM", "--freeze-ViT",
        "--train-iters", str(schedule.stage1_iters), "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "5",
        "--load", str(checkpoints / "phase0"), "--finetune", "--save", str(checkpoints / "stage1"),
    ]
    stage2 = [
        "--data-path", str(data / "train.json"), "--chat-template", "mistral", "--freeze-ViT",
        "--train-iters", str(schedule.stage2_iters), "--lr", "5e-4", "--min-lr", "2e-5", "--lr-warmup-iters", "10",
        "--load", str(checkpoints / "stage1"), "--finetune", "--save", str(checkpoints / "stage2"),
    ]
    named = [("phase0", phase0), ("stage1", stage1), ("stage2", stage2)]
    if lora:
        named.append(("stage2_lora", [
            "--data-path", str(data / "train.json"), "--chat-template", "mistral", "--freeze-ViT",
            "--lora-rank", "8", "--lora-alpha", "16",
            "--train-iters", str(schedule.stage2_iters), "--lr", "2e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "10",
            "--pretrained-checkpoint", str(checkpoints / "stage1"), "--save", str(checkpoints / "stage2_lora"),
        ]))
    return [(name, [*common, *flags, "--tensorboard-dir", str(out / "tensorboard" / name)]) for name, flags in named]


def vocabulary(tokenizer: Path) -> dict[str, int]:
    from megamm.data.tokenizer import load_tokenizer

    loaded = load_tokenizer(tokenizer)
    return {"vocab_size": loaded.vocab_size, "image_token_id": loaded.image_token_id}


def evaluate(out: Path, blank: bool, model: str = "stage2") -> dict:
    """evaluate_vqa.py's scores of checkpoint `model` (under out/checkpoints) on the held-out questions."""
    command = torchrun(
        str(ROOT / "tools" / "evaluate_vqa.py"), "--load", str(out / "checkpoints" / model),
        "--tensor-model-parallel-size", "2", "--questions", str(out / "data" / "test.json"),
        "--image-root", str(out / "data"), "--batch-size", "64", "--json",
        "--predictions", str(out / f"predictions_{model}{'_blank' if blank else ''}.jsonl"),
    ) + (["--blank-image"] if blank else [])
    output = run(command, out / "logs" / f"eval_{model}{'_blank' if blank else ''}.log")
    return json.loads(output.strip().splitlines()[-1])


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
    args = parser.parse_args(argv)
    schedule = QUICK if args.quick else FULL
    out = args.out.resolve()
    if (out / "checkpoints").exists():
        raise SystemExit(f"demo: {out / 'checkpoints'} exists; remove {out} or pass another --out")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not (out / "data" / "train.json").exists():
        run([sys.executable, str(ROOT / "tools" / "make_shapes_dataset.py"), "--out", str(out / "data"),
             "--train-images", str(schedule.train_images), "--test-images", str(schedule.test_images),
             "--image-size", "32"], out / "logs" / "dataset.log")
    run([sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--input", str(out / "data" / "text.txt"),
         "--model-prefix", str(out / "tokenizer"), "--vocab-size", "128",
         "--user-defined-symbols", TEMPLATE_MARKERS], out / "logs" / "tokenizer.log")
    vocab = vocabulary(out / "tokenizer.model")
    for name, flags in phases(out, schedule, vocab, args.lora):
        run(torchrun("-m", "megamm.train", *flags), out / "logs" / f"{name}.log")
    seeing = evaluate(out, blank=False)
    blank = evaluate(out, blank=True)
    results = {"with_image": seeing, "blank_image": blank}
    if args.lora:
        run([sys.executable, str(ROOT / "tools" / "merge_lora.py"), "merge", "--load",
             str(out / "checkpoints" / "stage2_lora"), "--save", str(out / "checkpoints" / "stage2_lora_merged")],
            out / "logs" / "merge_lora.log")
        results["lora_with_image"] = evaluate(out, blank=False, model="stage2_lora_merged")
    table = report(seeing, blank, majority_baselines(out / "data" / "test.json"), results.get("lora_with_image"))
    (out / "results.txt").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    minutes = (time.perf_counter() - started) / 60
    print(f"\nHeld-out accuracy (exact match, greedy generation), stage-2 model:\n{table}")
    print(f"\ndemo finished in {minutes:.1f} min")
    print(f"  checkpoints: {out / 'checkpoints'} (phase0, stage1, stage2)")
    print(f"  logs:        {out / 'logs'}   TensorBoard: {out / 'tensorboard'}")
    print(f"  ask it:      .venv/bin/python tools/generate.py --load {out / 'checkpoints' / 'stage2'} "
          f"--image {out / 'data' / 'images' / 'test_0.png'} --prompt 'How many shapes are there?'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
