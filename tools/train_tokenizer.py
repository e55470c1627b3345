"""Train a sentencepiece tokenizer for megamm from text files or LLaVA conversation files.

    python tools/train_tokenizer.py --input a.txt data.jsonl --model-prefix out/tok --vocab-size 1000 \\
        [--model-type bpe|unigram] [--character-coverage 1.0] [--user-defined-symbols "<image>,<pad>"] \\
        [--byte-fallback] [--seed 0] [--max-bad-sample-fraction 0.5] [--verbose]

Writes `<prefix>.model` (load it with `megamm.data.tokenizer.load_tokenizer`) and `<prefix>.vocab`.

Inputs: a `.json` / `.jsonl` file is read as LLaVA conversation records (`{"conversations": [{"from":
..., "value": ...}]}`; a `.json` file holds a list of them or one record, a `.jsonl` file one per line):
the "value" texts are used with the image placeholder removed, so a tokenizer can be trained on a
data set's own text. Any other file is plain text, one sentence per line. The inputs are streamed to
sentencepiece in the order given, one sentence per line of text.

Bad records are skipped and counted, as training does (megamm.data.sources): a conversation file is
read by the training reader (`LlavaJsonSource`, image references not resolved since only the text is
used), so a row that training would skip as bad (a malformed JSONL line, a wrong schema, an `<image>`
count that differs from the image count) is skipped here too; in a text file a line that is not UTF-8 is
a bad record (kind "encoding"). Each of the first few bad records of a file is printed to stderr, and
after training one line per file gives the counts: `FILE: R records read, B bad skipped (json 1, ...)`.
When more than `--max-bad-sample-fraction` (default 0.5, as in training) of a file's records are bad,
the tool stops with exit code 2 and the counts: checked once 100 records are read and again at the end
of the file, so a small file that is mostly bad stops too (0 stops at the first bad record). A file
that is missing or unusable as a whole (a `.json` file that is not JSON) stops it the same way.

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
import os
import sys
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from megamm.data.sources import BadSample, LlavaJsonSource, Record, SkippingReader, SourceError

IMAGE_TOKEN = "<image>"
TOOL = "train_tokenizer.py"
# Bad records of one file printed to stderr before the rest are only counted.
PRINTED_BAD_RECORDS = 5
# As in training: the bad fraction is first checked once this many records were read.
MIN_RECORDS_FOR_CHECK = 100


class InputError(ValueError):
    """Unusable input (a missing file, too many bad records, no text); the message names the file."""


class ConversationRows(LlavaJsonSource):
    """A LLaVA file's rows, checked as training checks them, image references left unresolved.

    Only the text is used, so images need not exist. A `.json` file is read as one JSON document, a list
    of records or a single record; any other file as training reads it (a JSON list when it starts with
    "[", else JSONL).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path, image_root=None)

    def _first_char(self) -> bytes:
        return b"[" if self.path.suffix == ".json" else super()._first_char()

    def _load_list(self) -> None:
        super()._load_list()
        if isinstance(self._rows, dict):
            self._rows = [self._rows]
        elif not isinstance(self._rows, list):
            raise SourceError(f"{self.name}: expected a JSON list of records or one record")

    def _resolve(self, names: list[str]) -> list[str]:
        return list(names)


class TextLines:
    """The non-blank lines of a text file as records with one turn; a line that is not UTF-8 is a
    BadSample of kind "encoding". The file stays open from the first access until `close()`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = os.fspath(path)
        self._offsets = array("q")
        self._numbers = array("q")  # 1-based line numbers, for messages
        self._file: BinaryIO | None = None
        offset = 0
        try:
            with open(self.path, "rb") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        self._offsets.append(offset)
                        self._numbers.append(number)
                    offset += len(line)
        except OSError as error:
            raise SourceError(f"cannot read {self.name}: {error}") from error

    def close(self) -> None:
        """Close the file (reopened by the next access)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> Record:
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open across accesses, see close()
        self._file.seek(self._offsets[index])
        raw = self._file.readline().removesuffix(b"\n").removesuffix(b"\r")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadSample(self.name, f"line {self._numbers[index]}", "encoding", f"not UTF-8 text: {error}") from None
        return Record(self.name, index, f"{self.path.name}:{index}", [{"from": "text", "value": line}], [],
                      kind="text")


def conversation_texts(record: Record) -> Iterator[str]:
    """The lines of a conversation record's turn texts, image placeholders removed, blank lines dropped."""
    for turn in record.conversations:
        text = turn["value"].replace(IMAGE_TOKEN, "").strip()
        yield from (line for line in text.splitlines() if line.strip())


def reasons_text(reasons: dict[str, int]) -> str:
    """"json 1, schema 2" (sorted by kind), or "none"."""
    return ", ".join(f"{kind} {count}" for kind, count in sorted(reasons.items()) if count) or "none"


class InputFile:
    """One input file's sentences, read through `SkippingReader`: bad records skipped and counted.

    `sentences()` raises InputError naming the file when more than `max_bad_fraction` of its records are
    bad (checked from `MIN_RECORDS_FOR_CHECK` records on, and once more at the end of the file), and
    SourceError when the file as a whole is unusable. `summary()` gives the counts so far.
    """

    def __init__(
        self, path: Path, max_bad_fraction: float = 0.5, log: Callable[[str], None] | None = None
    ) -> None:
        self.path = path
        self.max_bad_fraction = max_bad_fraction
        self.log = log if log is not None else (lambda message: print(message, file=sys.stderr))
        self.records = 0
        self.bad = 0
        self.reasons: dict[str, int] = {}
        self._first_bad: str | None = None
        self._noted = 0  # bad records seen by the log

    @property
    def is_conversations(self) -> bool:
        return self.path.suffix in (".json", ".jsonl")

    def _note_bad(self, message: str) -> None:
        if self._first_bad is None:
            self._first_bad = message.removeprefix("skipping bad sample ")
        self._noted += 1
        if self._noted <= PRINTED_BAD_RECORDS:
            self.log(f"{TOOL}: {message}")
        elif self._noted == PRINTED_BAD_RECORDS + 1:
            self.log(f"{TOOL}: {self.path}: further bad records are counted, not printed")

    def _update(self, reader: SkippingReader) -> None:
        stats = reader.stats()
        self.records, self.bad, self.reasons = stats.samples, stats.bad, stats.reasons

    def _too_many_bad(self) -> InputError:
        return InputError(
            f"{self.path}: {self.bad} of {self.records} records read are bad, more than "
            f"--max-bad-sample-fraction {self.max_bad_fraction} ({reasons_text(self.reasons)}); "
            f"first bad record {self._first_bad}"
        )

    def sentences(self) -> Iterator[str]:
        """The file's sentences in order: conversation texts for .json/.jsonl, lines otherwise."""
        if not self.path.is_file():
            raise InputError(f"input file not found: {self.path}")
        if self.is_conversations:
            yield from self._read(ConversationRows(self.path), conversation_texts)
        else:
            lines = TextLines(self.path)
            try:
                yield from self._read(lines, lambda record: iter([record.conversations[0]["value"]]))
            finally:
                lines.close()

    def _read(self, source: ConversationRows | TextLines, texts: Callable[[Record], Iterator[str]]) -> Iterator[str]:
        reader = SkippingReader(source, self.max_bad_fraction, MIN_RECORDS_FOR_CHECK, log=self._note_bad)
        for index in range(len(source)):
            try:
                record = reader.get(index)
            except RuntimeError as error:  # SkippingReader: the bad fraction passed the limit
                self._update(reader)
                raise self._too_many_bad() from error
            self._update(reader)
            if record is not None:
                yield from texts(record)
        if self.bad > self.max_bad_fraction * self.records:
            raise self._too_many_bad()

    def summary(self) -> str:
        return f"{self.path}: {self.records} records read, {self.bad} bad skipped ({reasons_text(self.reasons)})"


def read_sentences(path: Path, max_bad_fraction: float = 0.5) -> Iterator[str]:
    """Sentences (lines) of one input file, bad records skipped; see `InputFile`."""
    yield from InputFile(path, max_bad_fraction).sentences()


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=TOOL, description=__doc__.split("\n\n")[0])
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
    parser.add_argument(
        "--max-bad-sample-fraction", type=_fraction, default=0.5, metavar="F",
        help="stop when more than F of a file's records are bad (default 0.5, as in training; 0: any)",
    )
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train and write the model; returns the process exit status (2: bad input, the message on stderr)."""
    args = parse_args(argv)
    try:
        return _train(args)
    except (InputError, SourceError) as error:
        print(f"{TOOL}: {error}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    import sentencepiece as spm

    missing = [str(path) for path in args.input if not path.is_file()]
    if missing:
        raise InputError(f"input file(s) not found: {', '.join(missing)}")
    symbols = [s.strip() for s in args.user_defined_symbols.split(",") if s.strip()]
    files = [InputFile(path, args.max_bad_sample_fraction) for path in args.input]
    # An error while sentencepiece pulls sentences reaches us wrapped in its RuntimeError: keep the
    # original to report it as it is.
    failure: list[InputError | SourceError] = []

    def stream() -> Iterator[str]:
        try:
            for file in files:
                yield from file.sentences()
        except (InputError, SourceError) as error:
            failure.append(error)
            raise

    sentences = stream()
    first = next(sentences, None)
    if first is None:
        raise InputError(f"no text found in the inputs: {', '.join(map(str, args.input))}")
    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for sentence in itertools.chain([first], sentences):
            count += 1
            yield sentence

    args.model_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(args.seed)
    try:
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
    except RuntimeError:
        if failure:
            raise failure[0] from None
        raise
    model = Path(f"{args.model_prefix}.model")
    vocab_size = spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()
    records = sum(file.records for file in files)
    bad = sum(file.bad for file in files)
    print(
        f"trained a {args.model_type} tokenizer on {count} sentences from {records} records "
        f"({bad} bad skipped): vocab size {vocab_size}, model {model}"
    )
    for file in files:
        print(f"  {file.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
