"""The qwen2_vl chat template against the official Qwen2-VL chat template run by transformers.

The reference is the `chat_template` of Qwen2-VL-7B-Instruct / Qwen2.5-VL Instruct (their
chat_template.json), applied by transformers' `apply_chat_template` with a byte-level BPE tokenizer
trained in the test that has Qwen's special tokens; each `<|image_pad|>` / `<|video_pad|>` is then
expanded to the image's token count, as Qwen2VLProcessor does, and the whole text tokenized at once.
Our ids, built span by span, must equal those ids exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megamm.config.constants import IGNORE_INDEX
from megamm.data.qwen_template import QwenTokenized, render_qwen2_vl
from megamm.data.templates import AllLabelsMaskedError, render, render_prompt
from megamm.data.tokenizer import Tokenizer, load_tokenizer
from tests.data_fixtures import write_qwen_tokenizer

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "You are a helpful assistant.",
    "Describe both pictures. Which one is larger? The first one, clearly.",
    "What happens in the video? A cat jumps onto the table.",
    "Answer briefly. You are terse. Yes.",
]
CONVERSATION = [
    {"from": "human", "value": "<image>Describe both pictures.\n<image>Which one is larger?"},
    {"from": "gpt", "value": "The first one, clearly."},
    {"from": "human", "value": "What happens in the video?<video>"},
    {"from": "gpt", "value": "A cat jumps onto the table."},
]
WITH_SYSTEM = [
    {"from": "system", "value": "You are terse."},
    {"from": "human", "value": "<image>Answer briefly."},
    {"from": "gpt", "value": "Yes."},
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qwen_tokenizer(tmp_path_factory.mktemp("qwen_tokenizer") / "tokenizer.json", CORPUS)


@pytest.fixture(scope="module")
def ours(paths: Path) -> Tokenizer:
    return load_tokenizer(paths, image_token="<|image_pad|>", pad_token="<|endoftext|>")


def hf_messages(conversation: list[dict[str, str]]) -> list[dict]:
    """LLaVA turns -> Hugging Face messages with image / video / text content parts in order."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = []
    for turn in conversation:
        parts = []
        for chunk in re.split(r"(<image>|<video>)", turn["value"]):
            if chunk == "<image>":
                parts.append({"type": "image"})
            elif chunk == "<video>":
                parts.append({"type": "video"})
            elif chunk:
                parts.append({"type": "text", "text": chunk})
        messages.append({"role": roles[turn["from"]], "content": parts})
    return messages


def reference_ids(
    paths: Path, conversation: list, images: list[int], videos: list[int], prompt: bool = False
) -> list[int]:
    """transformers' rendering of the official template, pads expanded as Qwen2VLProcessor does."""
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(paths))
    hf.chat_template = QWEN2_VL_CHAT_TEMPLATE
    text = hf.apply_chat_template(hf_messages(conversation), tokenize=False, add_generation_prompt=prompt)
    for pad, counts in (("<|image_pad|>", images), ("<|video_pad|>", videos)):
        pieces = text.split(pad)
        assert len(pieces) == len(counts) + 1
        text = pieces[0] + "".join(
            pad * count + piece for count, piece in zip(counts, pieces[1:], strict=True)
        )
    return tokenizers.Tokenizer.from_file(str(paths)).encode(text, add_special_tokens=False).ids


def trained_text(tokenizer: Tokenizer, tokenized: QwenTokenized) -> list[str]:
    runs, previous = [], False
    for token, label in zip(tokenized.input_ids, tokenized.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return [tokenizer.decode(run) for run in runs]


def test_images_and_video_equal_transformers(paths: Path, ours: Tokenizer) -> None:
    tokenized = render_qwen2_vl(CONVERSATION, ours, tokens_per_image=[4, 6], tokens_per_video=[8])
    assert tokenized.input_ids == reference_ids(paths, CONVERSATION, [4, 6], [8])
    assert trained_text(ours, tokenized) == [
        "The first one, clearly.<|im_end|>",
        "A cat jumps onto the table.<|im_end|>",
    ]
    image_id, video_id = ours.token_id("<|image_pad|>"), ours.token_id("<|video_pad|>")
    assert ours.image_token_id == image_id
    assert [end - start for start, end in tokenized.image_spans] == [4, 6]
    assert [end - start for start, end in tokenized.video_spans] == [8]
    for spans, token in ((tokenized.image_spans, image_id), (tokenized.video_spans, video_id)):
        for start, end in spans:
            assert tokenized.input_ids[start - 1] == ours.token_id("<|vision_start|>")
            assert tokenized.input_ids[start:end] == [token] * (end - start)
            assert tokenized.input_ids[end] == ours.token_id("<|vision_end|>")
    assert tokenized.input_ids.count(image_id) == 10 and tokenized.input_ids.count(video_id) == 8


def test_system_turn_and_registry_render(paths: Path, ours: Tokenizer) -> None:
    """A system turn replaces the default one; `render(..., "qwen2_vl")` gives the same ids for images."""
    tokenized = render(WITH_SYSTEM, "qwen2_vl", ours, [3])
    assert tokenized.input_ids == reference_ids(paths, WITH_SYSTEM, [3], [])
    assert tokenized.input_ids == render_qwen2_vl(WITH_SYSTEM, ours, [3]).input_ids
    assert trained_text(ours, tokenized) == ["Yes.<|im_end|>"]


def test_generation_prompt_equals_transformers(paths: Path, ours: Tokenizer) -> None:
    prompt = render_prompt(WITH_SYSTEM[:2], "qwen2_vl", ours, [3])
    assert prompt.input_ids == reference_ids(paths, WITH_SYSTEM[:2], [3], [], prompt=True)


def test_errors(ours: Tokenizer) -> None:
    with pytest.raises(ValueError, match="render_qwen2_vl and tokens_per_video"):
        render(CONVERSATION, "qwen2_vl", ours, [4, 6])
    with pytest.raises(ValueError, match="1 <video> placeholders but tokens_per_video has 0"):
        render_qwen2_vl(CONVERSATION, ours, [4, 6])
    with pytest.raises(ValueError, match="tokens_per_video must be positive"):
        render_qwen2_vl(CONVERSATION, ours, [4, 6], [0])
    with pytest.raises(AllLabelsMaskedError):
        render_qwen2_vl(CONVERSATION[:1], ours, [4, 6])
