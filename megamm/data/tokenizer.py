"""One tokenizer interface over sentencepiece `.model` files and Hugging Face `tokenizer.json` files.

Chat templates build a sample's token ids and labels span by span (system text, a user turn, the image
placeholder, an assistant turn, ...) and never re-tokenize the whole conversation, because the label
mask must line up with the spans exactly. This module gives them what they need for that:

- `encode(text)`: the ids of `text` as a standalone document, tokenized as the backend does by default.
  sentencepiece prepends its "dummy prefix" space when the model says so (`add_dummy_prefix`, true for
  almost every model, Llama's included) and, if the model normalizes whitespace
  (`remove_extra_whitespaces`), strips and collapses spaces. A Hugging Face tokenizer applies its own
  normalizer / pre-tokenizer (e.g. Metaspace with `prepend_scheme="first"` prepends one space).
- `encode_piece(text)`: the ids of `text` as a *continuation* of earlier text: no prefix space is added
  and whitespace is kept exactly as written, so a template can write `encode_piece(" ASSISTANT:")` and
  get the leading space it asked for (sentencepiece: "▁ASSISTANT", ":"), and
  `decode(encode(a) + encode_piece(b)) == decode(encode(a)) + b` for text the vocabulary covers.
  Start a conversation with `encode` (or with `encode_piece` if the format wants no leading space) and
  continue it with `encode_piece`. For sentencepiece this is exact: the model is loaded a second time
  with `add_dummy_prefix` and `remove_extra_whitespaces` switched off. For Hugging Face tokenizers it is
  done by encoding `image_token + text` and dropping the image token's id: this removes a prefix a
  pre-tokenizer adds only to the *first* segment of the input (Metaspace `prepend_scheme="first"`); a
  tokenizer that prefixes every segment (ByteLevel `add_prefix_space=True`, Metaspace
  `prepend_scheme="always"`, a `Prepend` normalizer) still adds it, and byte-level tokenizers without a
  prefix space (GPT-2, Llama 3) behave exactly like `encode`.
- Neither method adds BOS or EOS: a template inserts `bos_id` / `eos_id` where its format wants them.
- Special token strings in the text: the image token and the pad token are always mapped to their single
  ids by both methods (a template may therefore also write "<image>" inside a span). A Hugging Face
  tokenizer also maps its other added tokens ("<|im_start|>", ...); sentencepiece control symbols
  ("<s>", "</s>") in text are tokenized as plain characters, as sentencepiece itself does.
- `decode(ids)`: the backend's decoding, special tokens kept as their strings. sentencepiece drops one
  leading space of the whole sequence (the dummy prefix) and decodes control ids (BOS/EOS) to "".

Special tokens: the image placeholder (default "<image>") and a pad token (default "<pad>") are added
when the tokenizer lacks them. A Hugging Face tokenizer gets them through `add_special_tokens` (an
existing entry is reused and made special, so it is never split or duplicated). A sentencepiece model's
vocabulary is fixed in the model file, so missing tokens get extra ids after it (`get_piece_size()`,
+1, ...) that this class handles in encode and decode; `tools/train_tokenizer.py` reserves both as
user-defined symbols so that models it trains need no extra ids. **The embedding / output layer must
have `tokenizer.vocab_size` rows** (the backend's vocabulary plus the added tokens), not the backend's
own count. A sentencepiece model trained with its own pad piece (`pad_id >= 0`) keeps it, whatever
its name (`pad_token` then reports that name).

`bos_id` / `eos_id` come from the backend (sentencepiece's `bos_id()` / `eos_id()`; for a Hugging Face
tokenizer the explicit `bos_token` / `eos_token` arguments, else `bos_token` / `eos_token` of a
`tokenizer_config.json` next to the file, else the first present of the common names in
`BOS_CANDIDATES` / `EOS_CANDIDATES`). They are `None` when the tokenizer has none: templates must
check before inserting them.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megamm.config import LanguageConfig

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_PAD_TOKEN = "<pad>"
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "<|im_start|>")
EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>", "<|eot_id|>")


class Tokenizer(ABC):
    """Backend-independent tokenizer; see the module docstring for the exact encode/decode semantics."""

    path: Path
    image_token: str
    pad_token: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    image_token_id: int

    def __init__(self, path: str | Path, image_token: str, pad_token: str) -> None:
        """The settings both backends share; checks that the file exists."""
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        self.image_token = image_token
        self.pad_token = pad_token

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text` as a standalone document (backend's default prefix space), no BOS/EOS."""

    @abstractmethod
    def encode_piece(self, text: str) -> list[int]:
        """Ids of `text` continuing earlier text: no prefix space, whitespace kept, no BOS/EOS."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens kept as their strings."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (backend vocabulary plus added tokens): the model's embedding size."""

    @property
    @abstractmethod
    def special_ids(self) -> set[int]:
        """Ids that are not text: BOS, EOS, pad, image, unknown and the backend's other special tokens."""

    @abstractmethod
    def _lookup(self, token: str) -> int | None:
        """Id of `token` as a single vocabulary entry, or None."""

    def has_token(self, token: str) -> bool:
        """Whether `token` is one vocabulary entry."""
        return self._lookup(token) is not None

    def token_id(self, token: str) -> int:
        """Id of `token` as one vocabulary entry; KeyError if the tokenizer has no such entry."""
        token_id = self._lookup(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary of {self.path}")
        return token_id

    def _resolve(self, token: str | None, candidates: tuple[str, ...], what: str) -> int | None:
        """Explicit token (must exist) or the first present candidate, or None."""
        if token is not None:
            token_id = self._lookup(token)
            if token_id is None:
                raise KeyError(f"{what} token {token!r} is not in the vocabulary of {self.path}")
            return token_id
        for candidate in candidates:
            token_id = self._lookup(candidate)
            if token_id is not None:
                return token_id
        return None


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def _write_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _proto_fields(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split a protobuf message into (field number, wire type, raw field bytes including the tag)."""
    fields = []
    pos = 0
    while pos < len(data):
        start = pos
        tag, pos = _read_varint(data, pos)
        wire_type = tag & 7
        if wire_type == 0:
            _, pos = _read_varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            pos += length
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        fields.append((tag >> 3, wire_type, data[start:pos]))
    if pos != len(data):
        raise ValueError("truncated protobuf message")
    return fields


def _without_prefix_space(model_proto: bytes) -> bytes:
    """The sentencepiece ModelProto with normalizer_spec.add_dummy_prefix and remove_extra_whitespaces off.

    Edited at the protobuf wire level (ModelProto field 3 = NormalizerSpec; its fields 3 and 4 are the
    two booleans) so that no `protobuf` dependency is needed.
    """
    out = bytearray()
    found = False
    for number, wire_type, raw in _proto_fields(model_proto):
        if number == 3 and wire_type == 2:
            found = True
            tag_len = len(_write_varint((3 << 3) | 2))
            _, body_start = _read_varint(raw, tag_len)
            spec = b"".join(r for n, _, r in _proto_fields(raw[body_start:]) if n not in (3, 4))
            spec += _write_varint(3 << 3) + b"\x00" + _write_varint(4 << 3) + b"\x00"
            raw = _write_varint((3 << 3) | 2) + _write_varint(len(spec)) + spec
        out += raw
    if not found:
        spec = _write_varint(3 << 3) + b"\x00" + _write_varint(4 << 3) + b"\x00"
        out += _write_varint((3 << 3) | 2) + _write_varint(len(spec)) + spec
    return bytes(out)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file, with the image and pad tokens as extra ids when the model lacks them."""

    def __init__(
        self,
        path: str | Path,
        *,
        image_token: str = DEFAULT_IMAGE_TOKEN,
        pad_token: str = DEFAULT_PAD_TOKEN,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        import sentencepiece as spm

        super().__init__(path, image_token, pad_token)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self.path.read_bytes())
            # Same model without the dummy prefix / whitespace normalization, for `encode_piece`.
            self._sp_piece = spm.SentencePieceProcessor()
            self._sp_piece.LoadFromSerializedProto(_without_prefix_space(self._sp.serialized_model_proto()))
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError; the proto edit ValueError
            raise ValueError(f"{self.path} is not a valid sentencepiece model: {exc}") from exc
        self._base_size = self._sp.get_piece_size()
        if self._sp.pad_id() >= 0:  # the model has its own pad piece: use it, whatever its name
            self.pad_token = pad_token = self._sp.id_to_piece(self._sp.pad_id())
        self._extra: dict[str, int] = {}
        for token in (image_token, pad_token):
            if self._lookup(token) is None:
                self._extra[token] = self._base_size + len(self._extra)
        self._extra_by_id = {i: t for t, i in self._extra.items()}
        self.image_token_id = self.token_id(image_token)
        self.pad_id = self.token_id(pad_token)
        # encode splits the text on the image and pad strings itself (longest first), native pieces or
        # extra ids alike, so both behave the same: one id each, and no lone dummy-prefix "▁" before a
        # special token that starts the text.
        self._specials = {image_token: self.image_token_id, pad_token: self.pad_id}
        self._split_re = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(self._specials, key=len, reverse=True)) + ")"
        )
        self.bos_id = self._resolve(bos_token, (), "bos") if bos_token else self._optional(self._sp.bos_id())
        self.eos_id = self._resolve(eos_token, (), "eos") if eos_token else self._optional(self._sp.eos_id())
        # Computed once: scanning the vocabulary for control pieces is O(vocab).
        special = {i for i in range(self._base_size) if self._sp.is_control(i) or self._sp.is_unknown(i)}
        special |= set(self._extra.values()) | {self.image_token_id, self.pad_id}
        self._special_ids = frozenset(special | {i for i in (self.bos_id, self.eos_id) if i is not None})

    @staticmethod
    def _optional(token_id: int) -> int | None:
        return token_id if token_id >= 0 else None

    def _lookup(self, token: str) -> int | None:
        if token in self._extra:
            return self._extra[token]
        token_id = self._sp.piece_to_id(token)  # unknown pieces map to unk_id: check the round trip
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def _encode(self, text: str, first_standalone: bool) -> list[int]:
        ids: list[int] = []
        for index, chunk in enumerate(self._split_re.split(text)):
            if chunk in self._specials:
                ids.append(self._specials[chunk])
            elif chunk:
                processor = self._sp if first_standalone and index == 0 else self._sp_piece
                ids.extend(processor.encode(chunk))
        return ids

    def encode(self, text: str) -> list[int]:
        return self._encode(text, first_standalone=True)

    def encode_piece(self, text: str) -> list[int]:
        return self._encode(text, first_standalone=False)

    def decode(self, ids: list[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        first = True

        def flush() -> None:
            nonlocal first
            if run:
                # Only the start of the sequence carries the dummy prefix; later runs keep their spaces.
                parts.append((self._sp if first else self._sp_piece).decode(run))
                run.clear()
            first = False

        for token_id in ids:
            token_id = int(token_id)
            if token_id in self._extra_by_id:
                flush()
                parts.append(self._extra_by_id[token_id])
            elif 0 <= token_id < self._base_size:
                run.append(token_id)
            else:
                raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size}) for {self.path}")
        flush()
        return "".join(parts)

    @property
    def vocab_size(self) -> int:
        return self._base_size + len(self._extra)

    @property
    def special_ids(self) -> set[int]:
        return set(self._special_ids)


def _config_token(value: Any) -> str | None:
    """A token from tokenizer_config.json: a string or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json, with the image and pad tokens added as special tokens."""

    def __init__(
        self,
        path: str | Path,
        *,
        image_token: str = DEFAULT_IMAGE_TOKEN,
        pad_token: str = DEFAULT_PAD_TOKEN,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as _HF

        super().__init__(path, image_token, pad_token)
        try:
            self._tok = _HF.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON or schema
            raise ValueError(f"{self.path} is not a valid tokenizers tokenizer.json: {exc}") from exc
        self._tok.encode_special_tokens = False  # special strings in text must map to their ids
        # Existing entries are reused (and become special, so the pre-tokenizer never splits them).
        self._tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys((image_token, pad_token))]
        )
        self.image_token_id = self.token_id(image_token)
        self.pad_id = self.token_id(pad_token)
        # max id + 1, not the entry count: added tokens may leave holes in the id range. Computed once:
        # get_vocab builds a dict of the whole vocabulary.
        self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        config_path = self.path.with_name("tokenizer_config.json")
        if config_path.is_file() and (bos_token is None or eos_token is None):
            try:
                config = json.loads(config_path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"{config_path} is not valid JSON: {exc}") from exc
            bos_token = bos_token or _config_token(config.get("bos_token"))
            eos_token = eos_token or _config_token(config.get("eos_token"))
        self.bos_id = self._resolve(bos_token, BOS_CANDIDATES, "bos")
        self.eos_id = self._resolve(eos_token, EOS_CANDIDATES, "eos")

    def _lookup(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_piece(self, text: str) -> list[int]:
        ids = self._tok.encode(self.image_token + text, add_special_tokens=False).ids
        if not ids or ids[0] != self.image_token_id:
            raise RuntimeError(f"{self.path}: the image token did not encode to its own id at the start")
        return ids[1:]

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size}) for {self.path}")
        return self._tok.decode(ids, skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_ids(self) -> set[int]:
        ids = {i for i, token in self._tok.get_added_tokens_decoder().items() if token.special}
        ids |= {self.image_token_id, self.pad_id}
        ids |= {i for i in (self.bos_id, self.eos_id) if i is not None}
        return ids


def check_tokenizer(
    tokenizer: Tokenizer, language: LanguageConfig, source: str, required: tuple[str, ...] = (),
    video_token: str | None = None,
) -> None:
    """The tokenizer must fit the language model: no id beyond its vocabulary, the same image token id
    (and, when the model has one and the template writes `video_token`, the same video token id), and
    every token of `required` (a chat template's `required_tokens`) as one vocabulary entry.

    ValueError naming `source` (e.g. "--tokenizer-model PATH") and every mismatch. Training and
    generation both check here, before any weights are read.
    """
    problems = []
    missing = [token for token in required if not tokenizer.has_token(token)]
    if missing:
        problems.append(f"it has no single token for {', '.join(map(repr, missing))} (the chat template writes "
                        "them as markers)")
    if tokenizer.vocab_size > language.vocab_size:
        problems.append(f"it has {tokenizer.vocab_size} tokens (added image/pad tokens included) but "
                        f"model.language.vocab_size is {language.vocab_size}")
    if tokenizer.image_token_id != language.image_token_id:
        problems.append(f"it gives the image token {tokenizer.image_token!r} id {tokenizer.image_token_id} but "
                        f"model.language.image_token_id is {language.image_token_id}")
    if video_token is not None and language.video_token_id is not None and tokenizer.has_token(video_token):
        video_id = tokenizer.token_id(video_token)
        if video_id != language.video_token_id:
            problems.append(f"it gives the video token {video_token!r} id {video_id} but "
                            f"model.language.video_token_id is {language.video_token_id}")
    if problems:
        raise ValueError(f"{source} does not fit the model: " + "; ".join(problems))


def load_tokenizer(
    path: str | Path,
    *,
    image_token: str = DEFAULT_IMAGE_TOKEN,
    pad_token: str = DEFAULT_PAD_TOKEN,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> Tokenizer:
    """Open a tokenizer, choosing the backend from the path.

    A `.model` file is sentencepiece; a `*.json` file (normally `tokenizer.json`), or a directory that
    contains `tokenizer.json` (checked first) or a `tokenizer.model`, is opened with the matching backend.
    FileNotFoundError for a missing path, ValueError for an unknown format or a corrupt file; both name
    the path.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in directory {path}")
    elif not path.exists():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    kwargs: dict[str, Any] = {
        "image_token": image_token,
        "pad_token": pad_token,
        "bos_token": bos_token,
        "eos_token": eos_token,
    }
    if path.suffix == ".model":
        return SentencePieceTokenizer(path, **kwargs)
    if path.suffix == ".json":
        return HFTokenizer(path, **kwargs)
    raise ValueError(
        f"unknown tokenizer format: {path} (expected a sentencepiece .model file, a tokenizer.json, "
        "or a directory containing one)"
    )
