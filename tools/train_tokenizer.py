"""Train a sentencepiece tokenizer for megamm from text files or LLaVA conversation files.

    python tools/train_tokenizer.py --input a.txt data.jsonl --model-prefix out/tok --vocab-size 1000 \\
        [--model-type bpe|unigram] [--character-coverage 1.0] [--user-defined-symbols "<image>,<pad>"] \\
        [--byte-fallback] [--seed 0] [--verbose]

Writes `<prefix>.model` (load it with `megamm.data.tokenizer.load_tokenizer`) and `<prefix>.vocab`.

Inputs: a `.json` / `.jsonl` file is read as LLaVA conversation records (`{"conversations": [{"from":
..., "value": ...}]}`; a `.json` file holds a list of them or one record, a `.jsonl` file one per line):
the "value" texts are used with the image placeholder removed, so a tokenizer can be trained on a
data set's own text. Any other file is plain text, one sentence per line. The inputs are streamed to
sentencepiece in the order given, one sentence per line of text.

Choices and why:
- The image and pad tokens ("<image>,<pad>" by default) are reserved as user-defined symbols, so each
  is one piece of the model's own vocabulary, is never split, and `load_tokenizer` needs no extra ids.
- `remove_extra_whitespaces` is off (as in Llama's tokenizer): whitespace survives an encode/decode
  round trip, which chat templates that tokenize span by span rely on. The dummy prefix space stays on.
  sentencepiece's default NFKC normalization is kept, which turns newlines and tabs into spaces:
  templates should not rely on "\n" surviving in text encoded with these models.
- Deterministic: the same inputs, options and `--model-prefix` give a byte-identical model file (the
  model records the prefix, not the input paths). Every sentence is used (`input_sentence_size=0`, no
  sampling or shuffling), training runs on one thread (`num_threads=1`, so no order-dependent
  merging of per-thread results) and sentencepiece's random generator is seeded with `--seed`.
- `--byte-fallback` adds the 256 byte pieces so that any text encodes without <unk>; it needs a vocab
  size above 256 + the other pieces, hence off by default for small test vocabularies.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"


def conversation_texts(record: Any, source: Path) -> Iterator[str]:
    """The "value" texts of one LLaVA record, image placeholder removed; TypeError for another schema."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise TypeError(f"{source}: expected records with a 'conversations' list, got {str(record)[:80]!r}")
    for turn in record["conversations"]:
        value = turn.get("value") if isinstance(turn, dict) else None
        if not isinstance(value, str):
            raise TypeError(f"{source}: a conversation turn has no string 'value': {str(turn)[:80]!r}")
        text = value.replace(IMAGE_TOKEN, "").strip()
        if text:
            yield text


def read_sentences(path: Path) -> Iterator[str]:
    """Sentences (lines) of one input file: conversation texts for .json/.jsonl, lines otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            records: list[Any] = []
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{number}: invalid JSON: {exc}") from exc
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON: {exc}") from exc
        records = data if isinstance(data, list) else [data]
    else:
        with path.open(encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield line
        return
    for record in records:
        for text in conversation_texts(record, path):
            yield from (line for line in text.splitlines() if line.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, type=Path, help="text, .json or .jsonl files")
    parser.add_argument("--model-prefix", required=True, type=Path, help="writes PREFIX.model, PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--character-coverage", type=float, default=1.0)
    parser.add_argument(
        "--user-defined-symbols",
        default=f"{IMAGE_TOKEN},<pad>",
        help="comma-separated pieces kept whole (default: the image and pad tokens); '' for none",
    )
    parser.add_argument("--byte-fallback", action="store_true", help="encode unknown characters as bytes")
    parser.add_argument("--seed", type=int, default=0, help="sentencepiece random generator seed")
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train and write the model; returns the process exit status."""
    import sentencepiece as spm

    args = parse_args(argv)
    symbols = [s.strip() for s in args.user_defined_symbols.split(",") if s.strip()]
    args.model_prefix.parent.mkdir(parents=True, exist_ok=True)
    sentences = (sentence for path in args.input for sentence in read_sentences(path))
    first = next(sentences, None)
    if first is None:
        raise ValueError(f"no text found in the inputs: {', '.join(map(str, args.input))}")
    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for sentence in itertools.chain([first], sentences):
            count += 1
            yield sentence

    spm.set_random_generator_seed(args.seed)
    # Streamed through an iterator rather than a temporary corpus file, so that no temporary path is
    # recorded in the model's trainer spec and equal inputs give byte-identical model files.
    spm.SentencePieceTrainer.train(
        sentence_iterator=counted(),
        minloglevel=0 if args.verbose else 2,  # 2: errors only
        model_prefix=str(args.model_prefix),
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        user_defined_symbols=symbols,
        byte_fallback=args.byte_fallback,
        remove_extra_whitespaces=False,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
    )
    model = Path(f"{args.model_prefix}.model")
    vocab_size = spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()
    print(
        f"trained a {args.model_type} tokenizer on {count} sentences: vocab size {vocab_size}, model {model}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
