"""Score a megamm checkpoint on a LLaVA-format question file by exact match.

    python tools/evaluate_vqa.py --load CKPT --questions val.json --image-root images/ \\
        [--predictions preds.jsonl] [--blank-image] [--json]
    torchrun --nproc-per-node 2 tools/evaluate_vqa.py --load CKPT --tensor-model-parallel-size 2 ...

The file is a LLaVA JSON list (or JSONL): {"id", "image", "conversations": [{"from": "human",
"value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}], optional "question_type" or "type"}. Each
question is answered (greedy unless sampling flags say otherwise) and compared with the reference
after normalization (lowercase, no punctuation, no articles; see megamm.inference.vqa). Prints a table
of the accuracy per question type (questions without one under "(untyped)") and "overall", with the
counts correct, scored and errors; --json prints the same as one JSON object; --predictions writes
one JSON line per question. --blank-image replaces every image with a uniform image of the
preprocessing mean colour: the score a model gets without seeing, to set against the real one.
--and-blank-image scores each question both ways in the same run (one start-up and one checkpoint
load instead of two): the blank-image table (--json: line) follows the real one, and with
--predictions PATH the blank-image predictions go to PATH with `_blank` before its suffix.
--limit scores the first N questions.

A question whose image is missing or unreadable is not scored: it counts as an error of its type (the
errors column), its predictions line holds the message, and the first message goes to stderr; the
rest are scored. Exit status 2 for bad input: a question file that is missing, malformed or empty, a
bad checkpoint, tokenizer or setting, or no question scored at all (every image failed: a wrong
--image-root?). The message names the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist

from megamm.checkpoint.format import CheckpointMismatchError
from megamm.inference import cli
from megamm.inference.vqa import (
    VqaItem,
    VqaRun,
    evaluate_vqa,
    format_score,
    load_questions,
    prediction_records,
)

TOOL = "evaluate_vqa.py"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Evaluate and print the scores; returns the process exit status (2: bad input)."""
    parser = argparse.ArgumentParser(prog=TOOL, description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", required=True, help="LLaVA-format JSON list or JSONL of questions")
    parser.add_argument("--predictions", help="write one JSON line per question here")
    parser.add_argument("--limit", type=_positive, help="score only the first N questions")
    parser.add_argument("--json", action="store_true", help="print the scores as one JSON object (per pass)")
    parser.add_argument("--and-blank-image", action="store_true",
                        help="a second pass with blank images in the same run (the baseline beside the score)")
    cli.add_arguments(parser)
    parser.set_defaults(max_new_tokens=16)
    args = parser.parse_args(argv)
    if args.and_blank_image and args.blank_image:
        parser.error("--and-blank-image already adds the --blank-image pass; pass one of them")
    path = Path(args.questions)
    try:
        items = load_questions(path)
    except (OSError, ValueError, TypeError) as error:
        print(f"{TOOL}: {error}", file=sys.stderr)
        return 2
    if args.limit is not None:
        items = items[: args.limit]
    state = cli.setup_state(args)
    try:
        session = cli.open_session(args, state)
        config = cli.generation_config(args, session)
        for blank in [args.blank_image, *([True] if args.and_blank_image else [])]:
            result, predictions, errors = evaluate_vqa(
                session, items, config, image_root=args.image_root or str(path.parent),
                batch_size=args.batch_size, blank_image=blank,
            )
            if cli.is_first_process():
                _report(args, path, items, VqaRun(result, predictions, errors), blank)
            if not result.overall.total:
                if cli.is_first_process():
                    print(f"{TOOL}: {path}: no question could be scored; check --image-root", file=sys.stderr)
                return 2
    except (OSError, ValueError, CheckpointMismatchError, NotImplementedError) as error:
        # A bad checkpoint, tokenizer, question or setting: the message says which; no traceback.
        print(f"{TOOL}: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _report(args: argparse.Namespace, path: Path, items: list[VqaItem], run: VqaRun, blank: bool) -> None:
    """Print one pass's scores (table or JSON) and write its predictions; `blank`: the blank-image
    pass, whose predictions go beside --predictions' file when --and-blank-image runs both."""
    result, predictions, errors = run
    if args.predictions:
        target = Path(args.predictions)
        if blank and args.and_blank_image:
            target = target.with_name(f"{target.stem}_blank{target.suffix}")
        lines = [json.dumps(record) for record in prediction_records(items, predictions, errors)]
        target.write_text("".join(line + "\n" for line in lines))
    if args.json:
        print(json.dumps({**result.as_dict(), "blank_image": blank}), flush=True)
    else:
        baseline = " (blank images)" if blank else ""
        print(f"{path}: {len(items)} questions{baseline}, exact match:\n{format_score(result)}", flush=True)
    if errors:
        first = errors[min(errors)]
        print(f"{TOOL}: {path}: {len(errors)} of {len(items)} questions not scored, their image could "
              f"not be loaded (first: {first})", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
