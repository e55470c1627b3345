"""Print samples exactly as the model will see them: tokens with their labels, image positions, tiles.

    python tools/preview_sample.py --data-path data/train.json --image-folder data/images \\
        --tokenizer-model tok.model --chat-template llava_v1 --seq-length 2048 --image-size 336 \\
        [--max-image-tiles 6] [--index 0 5 17 | --count 3] [--tokens]

or take every data setting from a training config: `--config run.yaml` (flags given here win).
An any-resolution model (LLaVA-NeXT, `model.anyres`) is previewed from its config too: each image is
its base image plus the tiles of its grid, and its size is listed.
A native-resolution model (the Qwen2-VL family, `model.vision.native_resolution`) is previewed from its
config: its patch sizes come from the model section, the pixel ranges and video sampling from the
training section (--min-pixels, ..., --video-max-frames).

For each sample: its file and id, length, trained-token count, the image spans with their tile grids
(native: each image's and video's (t, h, w) patch grid, patch count and token count; a video's sampled
frames and seconds per temporal patch), then the sequence as text in which trained spans are wrapped
in [[...]] and each image is one <image x N> marker (N image tokens; a video <video x N>). `--tokens`
adds one line per token: position, id, piece, label. A bad sample is printed with the reason the
loader would skip it.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from megamm.config.constants import IGNORE_INDEX
from megamm.config.parsing import read_yaml_tree, run_config_from_dict
from megamm.config.registry import CHAT_TEMPLATES
from megamm.data.datasets import open_source, parse_data_path
from megamm.data.native_samples import NativeSampleBuilder, native_settings
from megamm.data.qwen_template import VIDEO_PAD
from megamm.data.samples import ImageSettings, Sample, SampleBuilder
from megamm.data.sources import BadSample
from megamm.data.templates import template_tokenizer
from megamm.data.tokenizer import Tokenizer

# Settings read from a training config when not given as flags: flag name -> (section, field).
FROM_CONFIG = {
    "data_path": ("training", "data_path"),
    "image_folder": ("training", "image_folder"),
    "tokenizer_model": ("training", "tokenizer_model"),
    "chat_template": ("training", "chat_template"),
    "seq_length": ("training", "seq_length"),
    "image_aspect_ratio": ("training", "image_aspect_ratio"),
    "max_image_tiles": ("training", "max_image_tiles"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, action="append", default=[],
                        help="training YAML file(s) to take the data settings from (repeatable, as for training)")
    parser.add_argument("--data-path", nargs="+", help="dataset path(s), as for training")
    parser.add_argument("--image-folder")
    parser.add_argument("--tokenizer-model")
    parser.add_argument("--chat-template", choices=CHAT_TEMPLATES.names())
    parser.add_argument("--seq-length", type=int)
    parser.add_argument("--image-size", type=int, help="the vision tower's image size (default: from --config)")
    parser.add_argument("--image-tokens", type=int, help="image tokens per tower input (default: from --config)")
    parser.add_argument("--image-aspect-ratio", choices=("pad", "crop", "resize"))
    parser.add_argument("--max-image-tiles", type=int)
    parser.add_argument("--index", type=int, nargs="+", help="sample numbers in the (first) dataset file")
    parser.add_argument("--count", type=int, default=1, help="without --index: the first N samples")
    parser.add_argument("--tokens", action="store_true", help="also list every token with its label")
    return parser.parse_args(argv)


def _fill_from_config(args: argparse.Namespace) -> None:
    """Missing flags from --config; the image geometry from its model section (a native-resolution
    tower's patch settings as `args.native`, None otherwise)."""
    args.native = None
    args.anyres = None
    if not args.config:
        return
    # Read without the run's semantic checks: the data flags may come from this command line instead.
    config = run_config_from_dict(read_yaml_tree(args.config))
    for name, (section, field) in FROM_CONFIG.items():
        if getattr(args, name) is None:
            setattr(args, name, getattr(getattr(config, section), field))
    if config.model.vision.native_resolution is not None:
        args.native = native_settings(config.model.vision, config.training)
        return
    if args.image_size is None:
        args.image_size = config.model.vision.image_size
    args.anyres = config.model.anyres
    if args.image_tokens is None:
        args.image_tokens = config.model.tile_tokens


def _missing(args: argparse.Namespace) -> list[str]:
    needed = ("data_path", "tokenizer_model", "seq_length")
    if args.native is None:
        needed += ("image_size", "image_tokens")
    return [f"--{name.replace('_', '-')}" for name in needed if getattr(args, name) is None]


def _vision_lines(sample: Sample, merge: int) -> list[str]:
    """One line per image and video of a native-resolution sample: span, grid, patches, tokens."""
    native = sample.native
    lines = []
    for number, ((start, end), patches) in enumerate(zip(sample.image_spans, native.image_patches, strict=True)):
        t, h, w = native.image_grid_thw[number].tolist()
        lines.append(f"  image {number}: tokens [{start}, {end}), grid (t, h, w) = ({t}, {h}, {w}), {patches} "
                     f"patches, {patches // merge**2} tokens")
    for number, ((start, end), patches) in enumerate(zip(native.video_spans, native.video_patches, strict=True)):
        t, h, w = native.video_grid_thw[number].tolist()
        lines.append(f"  video {number}: tokens [{start}, {end}), grid (t, h, w) = ({t}, {h}, {w}), {patches} "
                     f"patches, {patches // merge**2} tokens, {native.second_per_grid[number]:.3g} s per "
                     "temporal patch")
    return lines


def _piece(tokenizer: Tokenizer, token: int) -> str:
    return repr(_decode(tokenizer, [token]))


def _decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Decoded text with BOS / EOS shown as <s> / </s> where the backend decodes them to nothing
    (sentencepiece; a Hugging Face tokenizer keeps its special tokens, e.g. Qwen's <|im_start|>)."""
    marks = {token: mark for token, mark in ((tokenizer.bos_id, "<s>"), (tokenizer.eos_id, "</s>"))
             if token is not None and not tokenizer.decode([token])}
    out, run = [], []
    for token in ids:
        if token in marks:
            out.append(tokenizer.decode(run) + marks[token])
            run = []
        else:
            run.append(token)
    out.append(tokenizer.decode(run))
    return "".join(out)


def render_sample(sample: Sample, tokenizer: Tokenizer, with_tokens: bool, merge: int | None = None) -> str:
    """The sample as text: trained spans in [[...]], each image as one <image x N> marker (a video as
    <video x N>). `merge`: a native-resolution tower's spatial merge size (its grids are listed)."""
    ids, labels = sample.input_ids, sample.labels
    trained = sum(label != IGNORE_INDEX for label in labels)
    lines = [
        f"{sample.source} | sample {sample.index} | id {sample.sample_id!r} | {len(ids)} tokens"
        + (f" (truncated from {sample.truncated_from})" if sample.truncated_from else "")
        + f" | {trained} trained",
    ]
    spans = sample.image_spans
    if sample.native is not None and merge is not None:
        lines += _vision_lines(sample, merge)
        spans = spans + sample.native.video_spans
    else:
        for number, (start, end) in enumerate(spans):
            cols, rows = sample.grids[number]
            size = "" if sample.image_sizes is None else (
                f" (base image + tiles; image {sample.image_sizes[number][0]}x{sample.image_sizes[number][1]}, "
                f"height x width)")
            lines.append(f"  image {number}: tokens [{start}, {end}), {sample.tiles_per_image[number]} tower "
                         f"input(s), tile grid {cols}x{rows}{size}")
    video_id = tokenizer.token_id(VIDEO_PAD) if tokenizer.has_token(VIDEO_PAD) else None
    pieces = []
    trained_flips = [i for i in range(1, len(ids)) if (labels[i] != IGNORE_INDEX) != (labels[i - 1] != IGNORE_INDEX)]
    boundaries = sorted({0, len(ids), *(p for span in spans for p in span), *trained_flips})
    for start, end in itertools.pairwise(boundaries):
        if ids[start] == tokenizer.image_token_id:
            pieces.append(f"<image x {end - start}>")
        elif ids[start] == video_id:
            pieces.append(f"<video x {end - start}>")
        elif labels[start] != IGNORE_INDEX:
            pieces.append(f"[[{_decode(tokenizer, ids[start:end])}]]")
        else:
            pieces.append(_decode(tokenizer, ids[start:end]))
    lines.append("  " + "".join(pieces))
    if with_tokens:
        for position, (token, label) in enumerate(zip(ids, labels)):
            mark = "train" if label != IGNORE_INDEX else "-"
            lines.append(f"    {position:5d} {token:7d} {_piece(tokenizer, token):20s} {mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _fill_from_config(args)
    missing = _missing(args)
    if missing:
        print(f"preview_sample.py: missing {', '.join(missing)} (give them, or --config)", file=sys.stderr)
        return 2
    template = args.chat_template or "llava_v1"
    tokenizer = template_tokenizer(args.tokenizer_model, template)
    builder: SampleBuilder | NativeSampleBuilder
    if args.native is not None:
        builder = NativeSampleBuilder(tokenizer, template, args.native, args.seq_length)
    else:
        settings = ImageSettings(args.image_size, args.image_aspect_ratio or "pad",
                                 max_tiles=args.max_image_tiles or 1, anyres=args.anyres)
        builder = SampleBuilder(tokenizer, template, settings, args.image_tokens, args.seq_length)
    merge = None if args.native is None else args.native.image.merge_size
    _, first = parse_data_path(args.data_path)[0]
    source = open_source(first, args.image_folder)
    indices = args.index if args.index is not None else range(min(args.count, len(source)))
    for index in indices:
        try:
            print(render_sample(builder.build(source[index]), tokenizer, args.tokens, merge))
        except BadSample as error:
            print(f"{first} | sample {index} | skipped by the loader ({error.kind}): {error}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
