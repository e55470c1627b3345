"""The Qwen2-VL chat template: ChatML with vision markers, built span by span like megamm.data.templates.

Text: the official Qwen2-VL / Qwen2.5-VL Instruct `chat_template` (its `chat_template.json`),

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n     (unless the first turn is a system one)
    <|im_start|>user\\n<|vision_start|><|image_pad|>...<|image_pad|><|vision_end|>question<|im_end|>\\n
    <|im_start|>assistant\\nanswer<|im_end|>\\n

with each "<image>" placeholder of a turn written where it stands as `<|vision_start|>`, that image's
`tokens_per_image[i]` image tokens and `<|vision_end|>` (the processor's expansion of one
`<|image_pad|>`), and each "<video>" placeholder likewise with `<|video_pad|>` tokens. Qwen's template
has no BOS, so none is added. The answer and its `<|im_end|>` are trained; everything else, the
"\\n" after an answer's `<|im_end|>` included, is not.

The image tokens are the tokenizer's `image_token_id`: the template's `image_token` is Qwen's
`<|image_pad|>`, which `templates.template_tokenizer` loads the tokenizer with (the model's
`image_token_id`; training checks the two agree). The ChatML and vision markers and `<|video_pad|>`
must be single vocabulary entries (`required_tokens`, checked by `check_tokenizer`).
`render(..., "qwen2_vl", ...)` renders conversations with images; `render_qwen2_vl` also takes
`tokens_per_video` (the native-resolution training samples, `megamm.data.native_samples`, which also
truncate without cutting a video), and `render_qwen2_vl_prompt` the generation prompt of such a
conversation (`megamm.inference.session`: a question with a video).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from megamm.data.templates import (
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    ChatTemplate,
    Tokenized,
    Turn,
    _Builder,
    _check_images,
    _system_first,
    _VideoBuilder,
    check_trained,
    check_videos,
    normalize_conversation,
    prompt_turns,
)
from megamm.data.tokenizer import Tokenizer

QWEN_SYSTEM = "You are a helpful assistant."
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"
IMAGE_PAD = "<|image_pad|>"
_VISION_RE = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


@dataclass
class QwenTokenized(Tokenized):
    """A rendered Qwen sample: `Tokenized` plus `video_spans` [start, end) of each video's tokens."""

    video_spans: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Qwen2VLTemplate(ChatTemplate):
    """Qwen2-VL / Qwen2.5-VL Instruct (see the module docstring)."""

    name: str = "qwen2_vl"
    stop_tokens: tuple[str, ...] = ("<|im_end|>",)
    system: str = QWEN_SYSTEM
    image_token: str = IMAGE_PAD
    required_tokens: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", VISION_START, VISION_END, VIDEO_PAD)

    def _content(self, b: _Builder, value: str, trained: bool) -> None:
        """A turn's text with its "<image>" / "<video>" placeholders wrapped in vision markers."""
        for chunk in _VISION_RE.split(value):
            if chunk in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
                b.special(VISION_START, trained=False)
                if chunk == IMAGE_PLACEHOLDER:
                    b.image()
                elif isinstance(b, _VideoBuilder):
                    b.video()
                else:
                    raise ValueError(
                        f"template {self.name!r}: the conversation has a {VIDEO_PLACEHOLDER} placeholder; "
                        "render it with megamm.data.qwen_template.render_qwen2_vl and tokens_per_video"
                    )
                b.special(VISION_END, trained=False)
            elif chunk:
                b.text(chunk, trained)

    def build(self, b: _Builder, turns: list[Turn]) -> None:
        system, turns = _system_first(turns, self.name)
        for role, value in [("system", self.system if system is None else system)] + [
            (turn.role, turn.value) for turn in turns
        ]:
            b.special("<|im_start|>", trained=False)
            b.text(f"{role}\n", trained=False)
            trained = role == "assistant"
            if trained and not value:
                continue  # the generation prompt: the assistant header alone
            self._content(b, value, trained)
            b.special("<|im_end|>", trained=trained)
            b.text("\n", trained=False)


QWEN2_VL = Qwen2VLTemplate()


def _build(
    turns: list[Turn], tokenizer: Tokenizer, tokens_per_image: Sequence[int], tokens_per_video: Sequence[int],
    template: Qwen2VLTemplate,
) -> QwenTokenized:
    _check_images(turns, tokens_per_image)
    check_videos(turns, tokens_per_video)
    builder = _VideoBuilder(tokenizer, tokens_per_image, tokens_per_video, tokenizer.token_id(VIDEO_PAD))
    template.build(builder, turns)
    result = builder.result()
    return QwenTokenized(
        result.input_ids, result.labels, result.image_spans, result.text, video_spans=builder.video_spans
    )


def render_qwen2_vl(
    conversation: Sequence[Mapping[str, object]],
    tokenizer: Tokenizer,
    tokens_per_image: Sequence[int] = (),
    tokens_per_video: Sequence[int] = (),
    template: Qwen2VLTemplate = QWEN2_VL,
) -> QwenTokenized:
    """`megamm.data.templates.render` for conversations that may hold videos.

    One positive count per "<image>" in `tokens_per_image` and per "<video>" in `tokens_per_video`
    (`VisionInput.num_tokens`), else ValueError; AllLabelsMaskedError if nothing would be trained.
    """
    tokenized = _build(normalize_conversation(conversation), tokenizer, tokens_per_image, tokens_per_video,
                       template)
    return check_trained(tokenized, template.name)


def render_qwen2_vl_prompt(
    conversation: Sequence[Mapping[str, object]],
    tokenizer: Tokenizer,
    tokens_per_image: Sequence[int] = (),
    tokens_per_video: Sequence[int] = (),
    template: Qwen2VLTemplate = QWEN2_VL,
) -> QwenTokenized:
    """`megamm.data.templates.render_prompt` for conversations that may hold videos: the ids
    `render_qwen2_vl` puts before the answer that would follow the last user turn."""
    return _build(prompt_turns(conversation), tokenizer, tokens_per_image, tokens_per_video, template)


__all__ = [
    "QWEN2_VL",
    "QWEN_SYSTEM",
    "VIDEO_PLACEHOLDER",
    "Qwen2VLTemplate",
    "QwenTokenized",
    "render_qwen2_vl",
    "render_qwen2_vl_prompt",
]
