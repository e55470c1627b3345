"""Answer questions about images with a megamm checkpoint, on the terminal.

    python tools/generate.py --load CKPT --image cat.png --prompt "What animal is this?"
    python tools/generate.py --load CKPT --image a.png --prompt "Colour?" --image b.png --prompt "Shape?"
    python tools/generate.py --load QWEN2_VL_CKPT --video clip.mp4 --prompt "What happens?"
    python tools/generate.py --load CKPT --prompts-file questions.jsonl --image-root images/
    torchrun --nproc-per-node 2 tools/generate.py --load CKPT --tensor-model-parallel-size 2 ...

--image/--video and --prompt are matched in order (`--image none` asks a text-only question; a
`--video` file, for a Qwen2-VL-family checkpoint, is decoded with PyAV). A prompts file is JSON or
JSONL: records {"image": path or null, "prompt": text} ("question" is accepted for "prompt"), or
{"video": a video file or a list of frame files, "frame_rate": frames per second of the frame list
(default 2), "prompt": text} as in training data; its paths are relative to --image-root (default:
the file's directory). All
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
from megamm.data.sources import DEFAULT_FRAME_RATE
from megamm.inference import cli
from megamm.inference.session import ImageInput, Video

NO_IMAGE = "none"


def _record_media(record: dict, where: str) -> ImageInput:
    """A prompts-file record's image path, Video or None; SystemExit naming the record when malformed."""
    image, video = record.get("image"), record.get("video")
    if video is None:
        if not (image is None or isinstance(image, str)):
            raise SystemExit(f"{where}: 'image' must be a path or null, got {image!r}")
        if "frame_rate" in record:
            raise SystemExit(f"{where}: 'frame_rate' is the rate of a 'video' frame list; the record has none")
        return image
    if image is not None:
        raise SystemExit(f"{where}: give an 'image' or a 'video', not both")
    frames = isinstance(video, list) and video and all(isinstance(frame, str) and frame for frame in video)
    if not (isinstance(video, str) and video) and not frames:
        raise SystemExit(f"{where}: 'video' must be a video file path or a non-empty list of frame paths, got {video!r}")
    rate = record.get("frame_rate", DEFAULT_FRAME_RATE)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise SystemExit(f"{where}: 'frame_rate' must be a positive number of frames per second, got {rate!r}")
    return Video(video, float(rate))


def read_prompts_file(path: Path) -> list[tuple[ImageInput, str]]:
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
        if not isinstance(prompt, str):
            raise SystemExit(f"{path} record {index}: needs a string 'prompt' and a path or null 'image'")
        pairs.append((_record_media(record, f"{path} record {index}"), prompt))
    return pairs


def questions(args: argparse.Namespace) -> tuple[list[tuple[ImageInput, str]], str | None]:
    """The (image, prompt) pairs asked for and the image root their paths are relative to."""
    if args.prompts_file and (args.prompt or args.media):
        raise SystemExit("give either --prompts-file or --image/--prompt pairs, not both")
    if args.prompts_file:
        path = Path(args.prompts_file)
        return read_prompts_file(path), args.image_root or str(path.parent)
    if not args.prompt:
        raise SystemExit("nothing to answer: give --prompt (with --image) or --prompts-file")
    media = args.media or []
    if len(media) != len(args.prompt):
        raise SystemExit(f"{len(media)} --image/--video for {len(args.prompt)} --prompt: give one image (or "
                         "'none') or video per prompt")
    pairs = [(None if item == NO_IMAGE else item, prompt) for item, prompt in zip(media, args.prompt, strict=True)]
    return pairs, args.image_root


def describe(media: ImageInput) -> str:
    """How a question's image or video is printed beside its answer."""
    if isinstance(media, Video):
        return media.describe()
    return str(media) if media is not None else "no image"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", action="append", dest="media",
                        help=f"an image file, or '{NO_IMAGE}' (repeat with --prompt)")
    parser.add_argument("--video", action="append", dest="media", type=Video,
                        help="a video file (Qwen2-VL-family checkpoints; repeat with --prompt)")
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
                print(f"[{describe(image)}] {prompt}\n  -> {answer.text}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
