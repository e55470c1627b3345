"""megamm.data.templates.render_prompt: a generation prompt is exactly what training put before an answer.

For every template and both tokenizers of tests/data/test_templates.py (the hand-checkable character fake and
a tiny trained sentencepiece model), the prompt's ids must equal the full rendering's ids up to the first
trained label of the answer that follows (one turn, and the second answer of two turns).
"""

from __future__ import annotations

import random

import pytest

from megamm.config.constants import IGNORE_INDEX
from megamm.config.registry import CHAT_TEMPLATES
from megamm.data.templates import LLAVA_V1_SYSTEM, Tokenized, render, render_prompt
from megamm.data.tokenizer import Tokenizer, load_tokenizer
from tests.data.test_templates import CAPTION, CHAT_TOKENS, Q1, TWO_TURNS, CharTokenizer, _load_tool, human

WORDS = "what is the capital of France Germany Paris Berlin and describe image a cat sat on mat"


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    pytest.importorskip("sentencepiece")
    tmp = tmp_path_factory.mktemp("sp_prompt")
    words = WORDS.split()
    rng = random.Random(1)
    lines = [LLAVA_V1_SYSTEM, "USER: hi ASSISTANT: yes.", "user assistant system", "A cat sat on the mat."]
    lines += [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + "?" for _ in range(200)]
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    symbols = ",".join(["<image>", "<pad>", *CHAT_TOKENS])
    args = ["--input", str(corpus), "--model-prefix", str(tmp / "tok"), "--vocab-size", "200"]
    assert _load_tool().main([*args, "--user-defined-symbols", symbols]) == 0
    return load_tokenizer(tmp / "tok.model")


def _tokenizer(kind: str, request: pytest.FixtureRequest) -> Tokenizer:
    return CharTokenizer() if kind == "fake" else request.getfixturevalue("sentencepiece")


def _trained_starts(tokenized: Tokenized) -> list[int]:
    """Index of the first token of every run of trained labels."""
    labels = tokenized.labels
    return [i for i, label in enumerate(labels) if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]


@pytest.mark.parametrize("kind", ["fake", "sentencepiece"])
@pytest.mark.parametrize("name", CHAT_TEMPLATES.names())
def test_prompt_is_the_prefix_before_the_first_answer(name: str, kind: str, request: pytest.FixtureRequest) -> None:
    tokenizer = _tokenizer(kind, request)
    conversation = CAPTION if name == "plain" else TWO_TURNS[:2]
    full = render(conversation, name, tokenizer, [3])
    prompt = render_prompt(conversation[:1], name, tokenizer, [3])
    first = _trained_starts(full)[0]
    assert prompt.input_ids == full.input_ids[:first]
    assert prompt.image_spans == full.image_spans
    assert all(label == IGNORE_INDEX for label in prompt.labels)


@pytest.mark.parametrize("kind", ["fake", "sentencepiece"])
@pytest.mark.parametrize("name", sorted(set(CHAT_TEMPLATES.names()) - {"plain"}))
def test_second_turn_prompt_is_the_prefix_before_the_second_answer(
    name: str, kind: str, request: pytest.FixtureRequest
) -> None:
    tokenizer = _tokenizer(kind, request)
    full = render(TWO_TURNS, name, tokenizer, [3])
    prompt = render_prompt(TWO_TURNS[:3], name, tokenizer, [3])
    second = _trained_starts(full)[1]
    assert prompt.input_ids == full.input_ids[:second]
    assert prompt.labels == full.labels[:second]  # the first answer keeps its labels


def test_golden_prompt_text() -> None:
    fake = CharTokenizer()
    assert render_prompt([human(Q1)], "llava_v1", fake, [2]).text == f"<s>{LLAVA_V1_SYSTEM} USER: {Q1} ASSISTANT:"
    assert render_prompt([human(Q1)], "chatml", fake, [2]).text == (
        f"<s><|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n"
    )
    system = [{"from": "system", "value": "Be brief."}, human("Hi?")]
    assert render_prompt(system, "mistral", fake).text == "<s>[INST] Be brief.\n\nHi? [/INST]"
    prompt = render_prompt([human(Q1)], "plain", fake, [2])
    assert prompt.input_ids == [fake.bos_id, fake.image_token_id, fake.image_token_id]


def test_prompt_errors() -> None:
    fake = CharTokenizer()
    with pytest.raises(ValueError, match="must end with a user turn"):
        render_prompt(TWO_TURNS[:2], "llava_v1", fake, [3])
    with pytest.raises(ValueError, match="must end with a user turn"):
        render_prompt([], "llava_v1", fake)
    with pytest.raises(ValueError, match="1 <image> placeholders but tokens_per_image has 0"):
        render_prompt([human(Q1)], "llava_v1", fake)
    with pytest.raises(ValueError, match="must be positive"):
        render_prompt([human(Q1)], "llava_v1", fake, [0])
    with pytest.raises(KeyError, match="unknown chat template"):
        render_prompt([human(Q1)], "nope", fake, [1])
