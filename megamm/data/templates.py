"""Chat templates: a LLaVA conversation -> token ids, labels and image spans, built span by span.

A conversation is a list of turns `{"from": "human" | "gpt" | "system", "value": str}` (LLaVA's JSON
format; "user" / "assistant" are accepted too). Images are the "<image>" placeholders in the text, in
order; the caller gives `tokens_per_image`, one entry per placeholder, because the model
(`megamm.models.llava`) expects `input_ids` to hold one image-token id per image embedding and tiled
images have different counts. Each placeholder is expanded into that many `image_token_id`s.

Why span by span: ids and labels are appended together while the sample is assembled (template text,
system and user text with label IGNORE_INDEX; assistant answers and the end token that closes them with
label = id; image positions IGNORE_INDEX). Re-tokenizing the whole rendered conversation and locating
the answers by counting tokens of its parts is the classic source of misaligned or fully masked labels
(LLaVA's "tokenization mismatch" warnings), because a tokenizer does not tokenize a string's parts the
way it tokenizes the whole.

encode vs encode_piece: a text piece uses `tokenizer.encode` (standalone text, with sentencepiece's
dummy prefix space) only when no text or template token precedes it in the sample (only BOS and
images), and `tokenizer.encode_piece` (continuation, whitespace exact) otherwise. Encoding every piece
with `encode` would inject one space at the start of each piece ("USER:" + " hi" -> "USER:  hi");
encoding the first piece with `encode_piece` would give a start-of-document word a token the model
never saw at that position. The space that separates an answer from its header (" Paris." after
"ASSISTANT:") is part of the answer span, so that sentencepiece's "▁Paris" token, which carries it, is
trained.

Special strings (<|eot_id|>, <|im_start|>, [INST], ...) are added as one id via `tokenizer.token_id`
when the vocabulary has them as single entries, otherwise they are encoded as text like any other
template text (a base model without the chat tokens still gets a consistent, if longer, format).
"</s>" ending an answer is `tokenizer.eos_id` when the tokenizer has one. BOS (`tokenizer.bos_id`) starts
a sample when the tokenizer has one, except in templates that define their own begin token (llama3),
and it is not doubled when it is the template's first token (a ChatML tokenizer whose BOS resolves to
<|im_start|>).

An empty assistant value means "no answer here": only the assistant header is rendered (LLaVA's
convention for a generation prompt), untrained. A sample in which nothing is trained raises
`AllLabelsMaskedError`: its loss would silently be 0 (the best-known LLaVA data bug), so the caller
must count and skip it explicitly.

Videos (LLaVA-OneVision's, `render_with_videos`) are "<video>" placeholders, each expanded to the
count the caller gives in ids `video_token_id`, untrained, as images are; `VideoTokenized` adds their
spans. The Qwen2-VL template wraps its videos in vision markers with the same builder
(`megamm.data.qwen_template`).

`Tokenized.text` is the rendered conversation for debugging: each image appears once as "<image>" and
BOS / EOS as "<s>" / "</s>" whatever the tokenizer calls them; the ids are authoritative.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from megamm.config.constants import IGNORE_INDEX
from megamm.config.registry import CHAT_TEMPLATES
from megamm.data.tokenizer import DEFAULT_IMAGE_TOKEN, Tokenizer, load_tokenizer

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
BOS_TEXT = "<s>"
EOS_TEXT = "</s>"
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_PLACEHOLDER_RE = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)})")
_VIDEO_RE = re.compile(f"({re.escape(VIDEO_PLACEHOLDER)})")


class AllLabelsMaskedError(ValueError):
    """Every label of a sample is IGNORE_INDEX: training on it gives loss 0; the caller counts and skips."""


@dataclass(frozen=True)
class Turn:
    """One normalized conversation turn; role is "system", "user" or "assistant"."""

    role: str
    value: str


@dataclass
class Tokenized:
    """A rendered sample: labels aligned with input_ids (the model shifts them), image spans [start, end).

    After `truncate`, `image_spans` lists the images that survived (always the first ones, in order) and
    `truncated_from` the length before truncation; `text` stays the full rendering.
    """

    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]]
    text: str
    truncated_from: int | None = None

    @property
    def num_trained(self) -> int:
        """Number of positions with a label (not IGNORE_INDEX)."""
        return sum(label != IGNORE_INDEX for label in self.labels)

    def vision_spans(self) -> list[tuple[int, int]]:
        """[start, end) of every image (and video, `VideoTokenized`) in token order: what `truncate`
        never cuts."""
        return list(self.image_spans)

    def spans_before(self, cut: int) -> dict[str, list[tuple[int, int]]]:
        """The span fields of the prefix of `cut` tokens: the images wholly inside it."""
        return {"image_spans": [span for span in self.image_spans if span[1] <= cut]}


@dataclass
class VideoTokenized(Tokenized):
    """`Tokenized` plus `video_spans` [start, end) of each video's tokens (`render_with_videos`)."""

    video_spans: list[tuple[int, int]] = field(default_factory=list)

    def vision_spans(self) -> list[tuple[int, int]]:
        return sorted(self.image_spans + self.video_spans)

    def spans_before(self, cut: int) -> dict[str, list[tuple[int, int]]]:
        return {**super().spans_before(cut), "video_spans": [span for span in self.video_spans if span[1] <= cut]}


TokenizedT = TypeVar("TokenizedT", bound=Tokenized)


def check_trained(tokenized: TokenizedT, template_name: str) -> TokenizedT:
    """`tokenized` as rendered by the template `template_name`; AllLabelsMaskedError when it trains no label."""
    if tokenized.num_trained == 0:
        raise AllLabelsMaskedError(
            f"all labels are masked in a {template_name!r} sample (no assistant answer to train on; its loss "
            f"would be 0): {tokenized.text[:200]!r}"
        )
    return tokenized


def check_trained_after_truncation(kept: TokenizedT, length: int) -> TokenizedT:
    """`kept`, the prefix of a sample of `length` tokens; AllLabelsMaskedError when it trains no label."""
    if kept.num_trained == 0:
        raise AllLabelsMaskedError(
            f"all labels are masked after truncating {length} tokens to {len(kept.input_ids)}: {kept.text[:200]!r}"
        )
    return kept


def normalize_conversation(conversation: Sequence[Mapping[str, object]]) -> list[Turn]:
    """LLaVA turns -> `Turn`s; ValueError (unknown role) or TypeError (non-string value) naming the turn."""
    turns = []
    for index, raw in enumerate(conversation):
        role = _ROLES.get(str(raw.get("from", raw.get("role"))))
        value = raw.get("value", raw.get("content"))
        if role is None:
            raise ValueError(
                f"turn {index}: unknown role {raw.get('from')!r}; expected one of {sorted(_ROLES)}"
            )
        if not isinstance(value, str):
            raise TypeError(f"turn {index}: 'value' must be a string, got {type(value).__name__}")
        turns.append(Turn(role, value))
    return turns


class _Builder:
    """Appends ids and labels span by span; expands image placeholders; tracks image spans."""

    def __init__(self, tokenizer: Tokenizer, tokens_per_image: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.spans: list[tuple[int, int]] = []
        self.text_parts: list[str] = []
        self._tokens_per_image = list(tokens_per_image)
        self._started = False  # a text or template token was added: later text is a continuation

    def _append(self, ids: list[int], trained: bool, rendered: str) -> None:
        self.ids.extend(ids)
        self.labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
        self.text_parts.append(rendered)

    def bos(self, unless: str | None = None) -> None:
        """BOS if the tokenizer has one, untrained; skipped when it is the id of template token `unless`."""
        bos_id = self.tokenizer.bos_id
        if bos_id is None or (unless is not None and self._single_id(unless) == bos_id):
            return
        self._append([bos_id], False, BOS_TEXT)

    def eos(self, trained: bool) -> None:
        """The end token: `eos_id` if the tokenizer has one, else "</s>" as a special string."""
        if self.tokenizer.eos_id is None:
            self.special(EOS_TEXT, trained)
        else:
            self._started = True
            self._append([self.tokenizer.eos_id], trained, EOS_TEXT)

    def _single_id(self, token: str) -> int | None:
        try:
            return self.tokenizer.token_id(token)
        except KeyError:
            return None

    def special(self, token: str, trained: bool) -> None:
        """A template token: one id when the vocabulary has it, else encoded as text."""
        token_id = self._single_id(token)
        if token_id is None:
            self.text(token, trained)
        else:
            self._started = True
            self._append([token_id], trained, token)

    def next_image_tokens(self) -> int:
        """The token count of the next image (ValueError past the last image given)."""
        index = len(self.spans)
        if index >= len(self._tokens_per_image):
            raise ValueError(f"more image placeholders than the {len(self._tokens_per_image)} images given")
        return self._tokens_per_image[index]

    def image(self) -> None:
        """The next image: `tokens_per_image[i]` image-token ids, untrained."""
        count = self.next_image_tokens()
        start = len(self.ids)
        self._append([self.tokenizer.image_token_id] * count, False, IMAGE_PLACEHOLDER)
        self.spans.append((start, len(self.ids)))

    def text(self, text: str, trained: bool) -> None:
        """Text with its image placeholders expanded; `encode` only for the sample's first text."""
        for chunk in _PLACEHOLDER_RE.split(text):
            if chunk == IMAGE_PLACEHOLDER:
                self.image()
            elif chunk:
                ids = (self.tokenizer.encode_piece if self._started else self.tokenizer.encode)(chunk)
                if self.tokenizer.image_token_id in ids:
                    # e.g. the tokenizer's image token is "<img>" and the text contains it: it would
                    # become one unexpanded image position that no image embedding fills.
                    raise ValueError(
                        f"text contains the tokenizer's image token outside a placeholder: {chunk!r}"
                    )
                self._started = True
                self._append(ids, trained, chunk)

    def result(self) -> Tokenized:
        return Tokenized(list(self.ids), list(self.labels), list(self.spans), "".join(self.text_parts))


class _VideoBuilder(_Builder):
    """A builder that also expands videos: `tokens_per_video[i]` ids `video_token_id`, untrained."""

    def __init__(self, tokenizer: Tokenizer, tokens_per_image: Sequence[int], tokens_per_video: Sequence[int],
                 video_token_id: int) -> None:
        super().__init__(tokenizer, tokens_per_image)
        self.video_spans: list[tuple[int, int]] = []
        self._tokens_per_video = list(tokens_per_video)
        self._video_token_id = video_token_id

    def video(self) -> None:
        """The next video: `tokens_per_video[i]` video-token ids, untrained."""
        index = len(self.video_spans)
        if index >= len(self._tokens_per_video):
            raise ValueError(
                f"more {VIDEO_PLACEHOLDER} placeholders than the {len(self._tokens_per_video)} videos given"
            )
        start = len(self.ids)
        self._append([self._video_token_id] * self._tokens_per_video[index], False, VIDEO_PLACEHOLDER)
        self.video_spans.append((start, len(self.ids)))

    def text(self, text: str, trained: bool) -> None:
        """Text with its video (and image) placeholders expanded."""
        for chunk in _VIDEO_RE.split(text):
            if chunk == VIDEO_PLACEHOLDER:
                self.video()
            elif chunk:
                super().text(chunk, trained)

    def result(self) -> VideoTokenized:
        tokenized = super().result()
        return VideoTokenized(tokenized.input_ids, tokenized.labels, tokenized.image_spans, tokenized.text,
                              video_spans=list(self.video_spans))


class ChatTemplate(ABC):
    """One conversation format; `build` adds the whole conversation to the builder."""

    name: str
    # Tokens that close an answer besides EOS (generation stops at them where the tokenizer has them
    # as single ids).
    stop_tokens: tuple[str, ...] = ()
    # The token every image position holds (the tokenizer is loaded with it, `template_tokenizer`), and
    # the tokens the template needs as single vocabulary entries (`check_tokenizer` refuses a tokenizer
    # without them, since they would otherwise be encoded as text).
    image_token: str = DEFAULT_IMAGE_TOKEN
    required_tokens: tuple[str, ...] = ()

    @abstractmethod
    def build(self, b: _Builder, turns: list[Turn]) -> None:
        """Append the turns' ids and labels."""

    def builder(self, tokenizer: Tokenizer, tokens_per_image: Sequence[int]) -> _Builder:
        """The builder `render` fills; a template that writes images its own way returns its own."""
        return _Builder(tokenizer, tokens_per_image)


def _system_first(turns: list[Turn], name: str) -> tuple[str | None, list[Turn]]:
    """(system text or None, the other turns); a system turn anywhere but first is a ValueError."""
    system = turns[0].value if turns and turns[0].role == "system" else None
    rest = turns[1:] if system is not None else turns
    if any(turn.role == "system" for turn in rest):
        raise ValueError(f"template {name!r}: a system turn is only allowed first")
    return system, rest


@dataclass(frozen=True)
class PlainTemplate(ChatTemplate):
    """LLaVA stage-1 captioning: BOS, the image(s), the caption, EOS; caption and EOS trained.

    As LLaVA's `preprocess_plain`, the sample is one human turn and one gpt turn, and the human text other
    than its image placeholders is dropped (the instruction is noise for alignment pretraining).
    """

    name: str = "plain"

    def build(self, b: _Builder, turns: list[Turn]) -> None:
        if [t.role for t in turns] != ["user", "assistant"]:
            raise ValueError(
                f"template 'plain' needs one human turn then one gpt turn, got {[t.role for t in turns]}"
            )
        b.bos()
        for _ in range(turns[0].value.count(IMAGE_PLACEHOLDER)):
            b.image()
        if turns[1].value:
            b.text(turns[1].value, trained=True)  # the first text: a standalone caption
            b.eos(trained=True)


@dataclass(frozen=True)
class LlavaV1Template(ChatTemplate):
    """LLaVA-1.5's conv_vicuna_v1 (SeparatorStyle.TWO): "SYSTEM USER: q ASSISTANT: a</s>USER: ...".

    The separator a turn ends with is tokenized with the next span (" USER:", " ASSISTANT:") so that
    sentencepiece's "▁USER" / "▁ASSISTANT" tokens carry it, as they do in the whole prompt.

    Separators alternate " " (after the system and each user turn) and "</s>" (after each answer, as
    EOS). The answer with its leading space and its "</s>" are trained, as in LLaVA's `preprocess_v1`
    (which masks through "ASSISTANT:"); an empty answer renders "ASSISTANT:" alone, as LLaVA's
    get_prompt does for a missing message.
    """

    name: str = "llava_v1"
    system: str = LLAVA_V1_SYSTEM

    def build(self, b: _Builder, turns: list[Turn]) -> None:
        system, turns = _system_first(turns, self.name)
        b.bos()
        b.text(self.system if system is None else system, trained=False)
        sep = " "  # the separator owed by the previous turn: " " after the system and user turns
        for turn in turns:
            if turn.role == "user":
                b.text(f"{sep}USER: {turn.value}", trained=False)
                sep = " "
            else:
                b.text(f"{sep}ASSISTANT:", trained=False)
                if turn.value:
                    b.text(f" {turn.value}", trained=True)
                    b.eos(trained=True)
                sep = ""  # "</s>" was the separator (or, for an empty answer, LLaVA adds none)


@dataclass(frozen=True)
class Llama3Template(ChatTemplate):
    """Llama 3: <|begin_of_text|> then <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>.

    <|begin_of_text|> is the template's begin token, so the tokenizer's BOS is not added. The assistant
    content and its <|eot_id|> are trained.
    """

    name: str = "llama3"
    stop_tokens: tuple[str, ...] = ("<|eot_id|>",)

    def build(self, b: _Builder, turns: list[Turn]) -> None:
        _system_first(turns, self.name)
        b.special("<|begin_of_text|>", trained=False)
        for turn in turns:
            b.special("<|start_header_id|>", trained=False)
            b.text(turn.role, trained=False)
            b.special("<|end_header_id|>", trained=False)
            if turn.role != "assistant":
                b.text(f"\n\n{turn.value}", trained=False)
                b.special("<|eot_id|>", trained=False)
            else:
                b.text("\n\n", trained=False)
                if turn.value:
                    b.text(turn.value, trained=True)
                    b.special("<|eot_id|>", trained=True)


@dataclass(frozen=True)
class ChatMLTemplate(ChatTemplate):
    """ChatML: <|im_start|>role\\ncontent<|im_end|>\\n; assistant content and its <|im_end|> trained.

    ChatML has no begin token of its own: BOS starts the sample if the tokenizer has one that is not
    <|im_start|> itself. The "\\n" after <|im_end|> is template text (untrained).
    """

    name: str = "chatml"
    stop_tokens: tuple[str, ...] = ("<|im_end|>",)

    def build(self, b: _Builder, turns: list[Turn]) -> None:
        _system_first(turns, self.name)
        b.bos(unless="<|im_start|>")
        for turn in turns:
            b.special("<|im_start|>", trained=False)
            trained = turn.role == "assistant"
            if trained:
                b.text("assistant\n", trained=False)
                if not turn.value:
                    continue
                b.text(turn.value, trained=True)
            else:
                b.text(f"{turn.role}\n{turn.value}", trained=False)
            b.special("<|im_end|>", trained=trained)
            b.text("\n", trained=False)


@dataclass(frozen=True)
class MistralTemplate(ChatTemplate):
    """Mistral instruct: "<s>[INST] q [/INST] a</s>[INST] q2 [/INST] a2</s>"; " a" and "</s>" trained.

    Mistral has no system role: a system turn is prepended to the first user message followed by a
    blank line, as Mistral's later chat templates do.
    """

    name: str = "mistral"

    def build(self, b: _Builder, turns: list[Turn]) -> None:
        system, turns = _system_first(turns, self.name)
        b.bos()
        for turn in turns:
            if turn.role == "user":
                value = f"{system}\n\n{turn.value}" if system is not None else turn.value
                system = None
                b.special("[INST]", trained=False)
                b.text(f" {value} ", trained=False)
                b.special("[/INST]", trained=False)
            elif turn.value:
                b.text(f" {turn.value}", trained=True)
                b.eos(trained=True)


PLAIN = PlainTemplate()
LLAVA_V1 = LlavaV1Template()
LLAMA3 = Llama3Template()
CHATML = ChatMLTemplate()
MISTRAL = MistralTemplate()


def get_template(name: str) -> ChatTemplate:
    """The template registered as `name` (megamm.config.registry.CHAT_TEMPLATES); KeyError listing
    the known names."""
    return CHAT_TEMPLATES.get(name)


def template_tokenizer(path: str | Path, template: str | ChatTemplate) -> Tokenizer:
    """The tokenizer at `path` loaded for `template`: with its image token (Qwen2-VL's `<|image_pad|>`
    for qwen2_vl, `<image>` for the others)."""
    template = get_template(template) if isinstance(template, str) else template
    return load_tokenizer(path, image_token=template.image_token)


def _check_placeholders(turns: list[Turn], placeholder: str, counts: Sequence[int], what: str) -> None:
    """One positive token count per `placeholder` in the turns, or ValueError (`what`: the counts' name)."""
    found = sum(turn.value.count(placeholder) for turn in turns)
    if found != len(counts):
        raise ValueError(f"the conversation has {found} {placeholder} placeholders but {what} has {len(counts)} entries")
    if any(count < 1 for count in counts):
        raise ValueError(f"{what} must be positive, got {list(counts)}")


def _check_images(turns: list[Turn], tokens_per_image: Sequence[int]) -> None:
    """One positive token count per "<image>" placeholder, or ValueError."""
    _check_placeholders(turns, IMAGE_PLACEHOLDER, tokens_per_image, "tokens_per_image")


def check_videos(turns: list[Turn], tokens_per_video: Sequence[int]) -> None:
    """One positive token count per "<video>" placeholder, or ValueError."""
    _check_placeholders(turns, VIDEO_PLACEHOLDER, tokens_per_video, "tokens_per_video")


def render(
    conversation: Sequence[Mapping[str, object]],
    template: str | ChatTemplate,
    tokenizer: Tokenizer,
    tokens_per_image: Sequence[int] = (),
) -> Tokenized:
    """Ids, labels and image spans of one conversation (see the module docstring for the rules).

    ValueError if the number of "<image>" placeholders differs from `len(tokens_per_image)` or a count is
    not positive; AllLabelsMaskedError if nothing would be trained.
    """
    chat = get_template(template) if isinstance(template, str) else template
    turns = normalize_conversation(conversation)
    _check_images(turns, tokens_per_image)
    builder = chat.builder(tokenizer, tokens_per_image)
    chat.build(builder, turns)
    return check_trained(builder.result(), template if isinstance(template, str) else chat.name)


def render_with_videos(
    conversation: Sequence[Mapping[str, object]],
    template: str | ChatTemplate,
    tokenizer: Tokenizer,
    tokens_per_image: Sequence[int],
    tokens_per_video: Sequence[int],
    video_token_id: int,
) -> VideoTokenized:
    """`render` for a conversation that may hold "<video>" placeholders (LLaVA-OneVision): each
    expands to its `tokens_per_video` count of `video_token_id`, untrained. A template that writes
    images its own way (its own `builder`, e.g. tile tags) is refused: its builder knows no videos."""
    chat = get_template(template) if isinstance(template, str) else template
    if type(chat).builder is not ChatTemplate.builder:
        raise ValueError(f"template {chat.name!r} builds its images its own way; it cannot render videos")
    turns = normalize_conversation(conversation)
    _check_images(turns, tokens_per_image)
    check_videos(turns, tokens_per_video)
    builder = _VideoBuilder(tokenizer, tokens_per_image, tokens_per_video, video_token_id)
    chat.build(builder, turns)
    if len(builder.video_spans) != len(tokens_per_video):
        raise ValueError(f"template {chat.name!r} placed {len(builder.video_spans)} of the conversation's "
                         f"{len(tokens_per_video)} {VIDEO_PLACEHOLDER} placeholders")
    return check_trained(builder.result(), chat.name)


def render_prompt(
    conversation: Sequence[Mapping[str, object]],
    template: str | ChatTemplate,
    tokenizer: Tokenizer,
    tokens_per_image: Sequence[int] = (),
) -> Tokenized:
    """The generation prompt: the turns given (ending with a user turn), then the assistant header.

    The ids are exactly those `render` puts before the first trained token of the answer that
    would follow (an empty assistant turn renders the header alone), so the model continues from
    the state training taught it to answer in. Labels are those of the earlier answers, if any;
    a prompt is not trained on, so nothing being trained is no error here. ValueError if the
    conversation does not end with a user turn or the image counts do not match.
    """
    chat = get_template(template) if isinstance(template, str) else template
    turns = prompt_turns(conversation)
    _check_images(turns, tokens_per_image)
    builder = chat.builder(tokenizer, tokens_per_image)
    chat.build(builder, turns)
    return builder.result()


def prompt_turns(conversation: Sequence[Mapping[str, object]]) -> list[Turn]:
    """A generation prompt's turns: the conversation (ending with a user turn, else ValueError) and an
    empty assistant turn, which templates render as the assistant header alone."""
    turns = normalize_conversation(conversation)
    if not turns or turns[-1].role != "user":
        roles = [turn.role for turn in turns]
        raise ValueError(f"a generation prompt must end with a user turn, got the roles {roles}")
    return [*turns, Turn("assistant", "")]


def truncate(tokenized: Tokenized, max_length: int) -> Tokenized | None:
    """Cut to at most `max_length` tokens, never through an image or a video (the cut moves before it).

    None when not even the prefix through the end of the first image or video fits (the sample is dropped; the
    caller counts it). AllLabelsMaskedError when the kept prefix has no trained label left, as in
    `render`. The images (and videos) after the cut are dropped: `image_spans` (`video_spans`) tells how many
    (the first ones) remain.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    length = len(tokenized.input_ids)
    if length <= max_length:
        return tokenized
    spans = tokenized.vision_spans()
    if spans and spans[0][1] > max_length:
        return None
    cut = max_length
    for start, end in spans:
        if start < cut < end:
            cut = start
    result = replace(
        tokenized,
        input_ids=tokenized.input_ids[:cut],
        labels=tokenized.labels[:cut],
        truncated_from=length if tokenized.truncated_from is None else tokenized.truncated_from,
        **tokenized.spans_before(cut),
    )
    return check_trained_after_truncation(result, length)


__all__ = [
    "IMAGE_PLACEHOLDER",
    "LLAVA_V1_SYSTEM",
    "VIDEO_PLACEHOLDER",
    "AllLabelsMaskedError",
    "ChatMLTemplate",
    "ChatTemplate",
    "Llama3Template",
    "LlavaV1Template",
    "MistralTemplate",
    "PlainTemplate",
    "Tokenized",
    "Turn",
    "VideoTokenized",
    "check_trained",
    "check_trained_after_truncation",
    "check_videos",
    "get_template",
    "normalize_conversation",
    "prompt_turns",
    "render",
    "render_with_videos",
    "template_tokenizer",
    "truncate",
]
