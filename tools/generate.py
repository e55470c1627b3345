"""Answer questions about images with a megamm checkpoint, on the terminal.

    python tools/generate.py --load CKPT --image cat.png --prompt "What animal is this?"
    python tools/generate.py --load CKPT --image a.png --prompt "Colour?" --image b.png --prompt "Shape?"
    python tools/generate.py --load CKPT --prompts-file questions.jsonl --image-root images/
    torchrun --nproc-per-node 2 tools/generate.py --load CKPT --tensor-model-parallel-size 2 ...

--image/--prompt pairs are matched in order (`--image none` asks a text-only question). A prompts
file is JSON or JSONL: records {"image": path or null, "prompt": text} ("question" is accepted for
"prompt"); its image paths are relative to --image-root (default: the file's directory). All
questions are answered in batches of --batch-size; sampling flags and the data settings the
checkpoint was trained with (tokenizer, chat template, image preprocessing) can be overridden, see
--help. Under torchrun, N processes run N / tp data-parallel replicas; the first process prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.distributed as dist

from megamm.checkpoint.format import CheckpointMismatchError
from megamm.inference import cli

NO_IMAGE = "none"


def read_prompts_file(path: Path) -> list[tuple[str | None, str]]:
    """(image, prompt) pairs of a JSON list or JSONL file; SystemExit naming the record on errors."""
    text = path.read_text()
    try:
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path}: not valid JSON: {error}") from error
    if not isinstance(records, list):
        raise SystemExit(f"{path}: expected a list of {{'image', 'prompt'}} records")
    pairs = []
    for index, record in enumerate(records):
        prompt = record.get("prompt", record.get("question")) if isinstance(record, dict) else None
        image = record.get("image") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not (image is None or isinstance(image, str)):
            raise SystemExit(f"{path} record {index}: needs a string 'prompt' and a path or null 'image'")
        pairs.append((image, prompt))
    return pairs


def questions(args: argparse.Namespace) -> tuple[list[tuple[str | None, str]], str | None]:
    """The (image, prompt) pairs asked for and the image root their paths are relative to."""
    if args.prompts_file and (args.prompt or args.image):
        raise SystemExit("give either --prompts-file or --image/--prompt pairs, not both")
    if args.prompts_file:
        path = Path(args.prompts_file)
        return read_prompts_file(path), args.image_root or str(path.parent)
    if not args.prompt:
        raise SystemExit("nothing to answer: give --prompt (with --image) or --prompts-file")
    images = args.image or []
    if len(images) != len(args.prompt):
        raise SystemExit(f"{len(images)} --image for {len(args.prompt)} --prompt: give one image (or 'none') per prompt")
    pairs = [(None if image == NO_IMAGE else image, prompt) for image, prompt in zip(images, args.prompt, strict=True)]
    return pairs, args.image_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", action="append", help=f"an image file, or '{NO_IMAGE}' (repeat with --prompt)")
    parser.add_argument("--prompt", action="append", help="a question (repeat for several)")
    parser.add_argument("--prompts-file", help="JSON/JSONL file of {'image', 'prompt'} records")
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    pairs, image_root = questions(args)
    state = cli.setup_state(args)
    try:
        session = cli.open_session(args, state)
        answers = session.answer(pairs, cli.generation_config(args, session), batch_size=args.batch_size,
                                 image_root=image_root, blank_image=args.blank_image)
    except (OSError, ValueError, CheckpointMismatchError, NotImplementedError) as error:
        # A bad checkpoint, tokenizer, image or setting: the message says which; no traceback.
        print(f"generate.py: {error}", file=sys.stderr)
        return 2
    else:
        if cli.is_first_process():
            for (image, prompt), answer in zip(pairs, answers, strict=True):
                print(f"[{image or 'no image'}] {prompt}\n  -> {answer.text}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
