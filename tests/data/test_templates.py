"""megamm.data.templates: golden renderings, label masks, image expansion, errors and truncation.

Two tokenizers: a character-level fake implementing the Tokenizer interface (so the expected ids can be
written by hand, and its `encode` adds a sentencepiece-like prefix space that only the first text piece
may get), and a tiny sentencepiece model trained in tmp with tools/train_tokenizer.py.
"""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

import pytest

from megamm.config.constants import IGNORE_INDEX
from megamm.config.registry import CHAT_TEMPLATES
from megamm.data.qwen_template import QWEN_SYSTEM
from megamm.data.templates import (
    LLAVA_V1_SYSTEM,
    AllLabelsMaskedError,
    Tokenized,
    get_template,
    render,
    truncate,
)
from megamm.data.tokenizer import Tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CHAT_TOKENS = (
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
    "[INST]",
    "[/INST]",
    "<|vision_start|>",
    "<|vision_end|>",
    "<img>",
    "</img>",
)
CHAR_OFFSET = 1000


def c(text: str) -> list[int]:
    """Hand-written ids of the fake tokenizer: one id per character."""
    return [CHAR_OFFSET + ord(ch) for ch in text]


class CharTokenizer(Tokenizer):
    """Character-level tokenizer: ids 0.. for special tokens, CHAR_OFFSET + ord(char) for characters.

    `encode` prepends one space (like sentencepiece's dummy prefix), `encode_piece` does not, so a
    template that used the wrong one shows in the ids. `decode` is the exact concatenation.
    """

    def __init__(self, chat_tokens: bool = True, eos: bool = True, bos_token: str = "<s>") -> None:
        tokens = ["<unk>", bos_token, "<pad>", "<image>", *(["</s>"] if eos else [])]
        tokens += [t for t in CHAT_TOKENS if chat_tokens and t != bos_token]
        self.path = Path("fake-char-tokenizer")
        self._ids = {token: index for index, token in enumerate(tokens)}
        self._tokens = dict(enumerate(tokens))
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(tokens, key=len)[::-1]) + ")")
        self.image_token, self.pad_token = "<image>", "<pad>"
        self.bos_id, self.pad_id, self.image_token_id = 1, 2, 3
        self.eos_id = 4 if eos else None

    def encode_piece(self, text: str) -> list[int]:
        ids: list[int] = []
        for chunk in self._split.split(text):
            ids.extend([self._ids[chunk]] if chunk in self._ids else c(chunk))
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_piece(" " + text)

    def decode(self, ids: list[int]) -> str:
        return "".join(self._tokens[i] if i < CHAR_OFFSET else chr(i - CHAR_OFFSET) for i in ids)

    @property
    def vocab_size(self) -> int:
        return CHAR_OFFSET + 0x110000

    @property
    def special_ids(self) -> set[int]:
        return set(self._tokens)

    def _lookup(self, token: str) -> int | None:
        return self._ids.get(token)


BOS, IMG, EOS = 1, 3, 4


def trained_runs(tokenized: Tokenized) -> list[list[int]]:
    """The maximal runs of consecutive trained positions, as ids (labels must equal the ids there)."""
    runs: list[list[int]] = []
    previous = False
    for token_id, label in zip(tokenized.input_ids, tokenized.labels, strict=True):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token_id
            if not previous:
                runs.append([])
            runs[-1].append(token_id)
        previous = trained
    return runs


def human(value: str) -> dict[str, str]:
    return {"from": "human", "value": value}


def gpt(value: str) -> dict[str, str]:
    return {"from": "gpt", "value": value}


Q1 = "<image>\nWhat is the capital of France?"
Q2 = "And of Germany?"
TWO_TURNS = [human(Q1), gpt("Paris."), human(Q2), gpt("Berlin.")]
CAPTION = [human("<image>\nDescribe the image briefly."), gpt("A cat sat on the mat.")]

# The hand-written renderings of TWO_TURNS (CAPTION for plain) and the text of the trained runs.
GOLDEN = {
    "plain": ("<s><image>A cat sat on the mat.</s>", [" A cat sat on the mat.</s>"]),
    "llava_v1": (
        f"<s>{LLAVA_V1_SYSTEM} USER: {Q1} ASSISTANT: Paris.</s>USER: {Q2} ASSISTANT: Berlin.</s>",
        [" Paris.</s>", " Berlin.</s>"],
    ),
    "llama3": (
        (
            "<|begin_of_text|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{Q1}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{Q2}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nBerlin.<|eot_id|>"
        ),
        ["Paris.<|eot_id|>", "Berlin.<|eot_id|>"],
    ),
    "chatml": (
        (
            f"<s><|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
            f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\nBerlin.<|im_end|>\n"
        ),
        ["Paris.<|im_end|>", "Berlin.<|im_end|>"],
    ),
    "mistral": (
        f"<s>[INST] {Q1} [/INST] Paris.</s>[INST] {Q2} [/INST] Berlin.</s>",
        [" Paris.</s>", " Berlin.</s>"],
    ),
}
GOLDEN["vicuna_v1"] = GOLDEN["llava_v1"]
# The image shows as "<image>" in the text (its tokens are the tokenizer's image token).
GOLDEN["qwen2_vl"] = (
    (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{Q1.replace('<image>', '<|vision_start|><image><|vision_end|>')}<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\nBerlin.<|im_end|>\n"
    ),
    ["Paris.<|im_end|>", "Berlin.<|im_end|>"],
)

# ChatML, the image wrapped in <img> ... </img> (megamm.data.internvl_template).
GOLDEN["internvl"] = (
    (
        f"<s><|im_start|>user\n{Q1.replace('<image>', '<img><image></img>')}<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\nBerlin.<|im_end|>\n"
    ),
    ["Paris.<|im_end|>", "Berlin.<|im_end|>"],
)

def sample_for(name: str) -> list[dict[str, str]]:
    return CAPTION if name == "plain" else TWO_TURNS


@pytest.fixture(scope="module")
def fake() -> CharTokenizer:
    return CharTokenizer()


# --------------------------------------------------------------------------- fake tokenizer goldens


@pytest.mark.parametrize("name", CHAT_TEMPLATES.names())
def test_golden_text_and_trained_spans(fake: CharTokenizer, name: str) -> None:
    text, answers = GOLDEN[name]
    t = render(sample_for(name), name, fake, [3])
    assert t.text == text
    assert [fake.decode(run) for run in trained_runs(t)] == answers
    assert len(t.input_ids) == len(t.labels)
    # The image placeholder became 3 image ids, untrained; no other image ids anywhere.
    assert len(t.image_spans) == 1
    start, end = t.image_spans[0]
    assert end - start == 3 and t.input_ids[start:end] == [IMG] * 3
    assert t.labels[start:end] == [IGNORE_INDEX] * 3
    assert t.input_ids.count(IMG) == 3
    # The ids spell the rendered text with the image expanded, plus the one dummy-prefix space of the
    # sample's first text piece (BOS-type tokens decode to themselves here).
    decoded = fake.decode(t.input_ids)
    assert decoded.replace("<image>" * 3, "<image>") in {text, text.replace(" ", "  ", 1)} | {
        text[: len(p)] + " " + text[len(p) :] for p in ("<s>", "<s><image>")
    }


def test_llava_v1_ids_by_hand(fake: CharTokenizer) -> None:
    t = render([human("<image>\nWhat?"), gpt("A cat.")], "llava_v1", fake, [2])
    prompt = [BOS, *c(" " + LLAVA_V1_SYSTEM + " USER: "), IMG, IMG, *c("\nWhat? ASSISTANT:")]
    answer = [*c(" A cat."), EOS]
    assert t.input_ids == prompt + answer
    assert t.labels == [IGNORE_INDEX] * len(prompt) + answer
    assert t.image_spans == [
        (len(prompt) - len(c("\nWhat? ASSISTANT:")) - 2, len(prompt) - len(c("\nWhat? ASSISTANT:")))
    ]


def test_plain_ids_by_hand_drop_the_instruction(fake: CharTokenizer) -> None:
    t = render([human("Describe <image> please"), gpt("A dog.")], "plain", fake, [4])
    assert t.input_ids == [BOS, IMG, IMG, IMG, IMG, *c(" A dog."), EOS]
    assert t.labels == [IGNORE_INDEX] * 5 + [*c(" A dog."), EOS]
    assert t.image_spans == [(1, 5)]
    assert "Describe" not in t.text and "please" not in t.text
    with pytest.raises(ValueError, match="one human turn then one gpt turn"):
        render([*CAPTION, human("more?")], "plain", fake, [1])


def test_llama3_and_chatml_ids_by_hand(fake: CharTokenizer) -> None:
    tid = fake.token_id
    t = render([{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Yo"}], "llama3", fake)
    head = [tid("<|begin_of_text|>"), tid("<|start_header_id|>")]
    user = [*c("user"), tid("<|end_header_id|>"), *c("\n\nHi"), tid("<|eot_id|>")]
    asst = [tid("<|start_header_id|>"), *c("assistant"), tid("<|end_header_id|>"), *c("\n\n")]
    assert t.input_ids == head + user + asst + [*c("Yo"), tid("<|eot_id|>")]
    assert BOS not in t.input_ids  # <|begin_of_text|> is llama3's own begin token
    t = render([human("Hi"), gpt("Yo")], "chatml", fake)
    start, end = tid("<|im_start|>"), tid("<|im_end|>")
    prompt = [BOS, start, *c("user\nHi"), end, *c("\n"), start, *c("assistant\n")]
    assert t.input_ids == prompt + [*c("Yo"), end, *c("\n")]
    assert t.labels == [IGNORE_INDEX] * len(prompt) + [*c("Yo"), end, IGNORE_INDEX]


def test_mistral_ids_by_hand(fake: CharTokenizer) -> None:
    inst, end_inst = fake.token_id("[INST]"), fake.token_id("[/INST]")
    t = render([human("Hi"), gpt("Yo")], "mistral", fake)
    assert t.input_ids == [BOS, inst, *c(" Hi "), end_inst, *c(" Yo"), EOS]
    assert t.labels == [IGNORE_INDEX] * 7 + [*c(" Yo"), EOS]


def test_system_turns(fake: CharTokenizer) -> None:
    conv = [{"from": "system", "value": "Be brief."}, human("Hi"), gpt("Yo")]
    assert render(conv, "llava_v1", fake).text == "<s>Be brief. USER: Hi ASSISTANT: Yo</s>"
    assert render(conv, "mistral", fake).text == "<s>[INST] Be brief.\n\nHi [/INST] Yo</s>"
    assert render(conv, "chatml", fake).text == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nYo<|im_end|>\n"
    )
    llama3 = render(conv, "llama3", fake)
    assert llama3.text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.")
    for name in ("llava_v1", "mistral", "chatml", "llama3"):
        t = render(conv, name, fake)
        assert all("brief" not in fake.decode(run) for run in trained_runs(t))
        with pytest.raises(ValueError, match="system turn is only allowed first"):
            render([human("Hi"), {"from": "system", "value": "x"}, gpt("Yo")], name, fake)


def test_special_strings_fall_back_to_text() -> None:
    """Without single-token chat strings (and without EOS) they are encoded as text, still masked right."""
    tok = CharTokenizer(chat_tokens=False, eos=False)
    t = render([human("Hi"), gpt("Yo")], "llama3", tok)
    # The first piece is the begin token as text: it gets encode's prefix space.
    assert t.input_ids[: len(c(" <|begin_of_text|>"))] == c(" <|begin_of_text|>")
    assert [tok.decode(run) for run in trained_runs(t)] == ["Yo<|eot_id|>"]
    t = render([human("Hi"), gpt("Yo")], "mistral", tok)
    assert t.input_ids[:3] == [BOS, *c(" [")]  # BOS, then "[INST]" as the first text: prefix space
    assert [tok.decode(run) for run in trained_runs(t)] == [" Yo</s>"]
    assert t.text == "<s>[INST] Hi [/INST] Yo</s>"


def test_chatml_bos_not_doubled_when_it_is_im_start() -> None:
    tok = CharTokenizer(bos_token="<|im_start|>")
    t = render([human("Hi"), gpt("Yo")], "chatml", tok)
    assert t.input_ids[:2] == [tok.token_id("<|im_start|>"), *c("u")]
    assert t.text.startswith("<|im_start|>user")


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("name", CHAT_TEMPLATES.names())
def test_two_images_with_different_counts(fake: CharTokenizer, name: str) -> None:
    conv = [human("<image>\n<image>\nCompare them."), gpt("Same.")]
    t = render(conv, name, fake, [2, 5])
    assert [end - start for start, end in t.image_spans] == [2, 5]
    (_, e1), (s2, _) = t.image_spans
    assert e1 <= s2
    for start, end in t.image_spans:
        assert t.input_ids[start:end] == [IMG] * (end - start)
        assert set(t.labels[start:end]) == {IGNORE_INDEX}
    assert t.input_ids.count(IMG) == 7
    assert t.text.count("<image>") == 2


def test_images_in_later_turns_keep_their_order(fake: CharTokenizer) -> None:
    conv = [human("<image> a"), gpt("x"), human("b <image>"), gpt("y")]
    t = render(conv, "llava_v1", fake, [1, 3])
    assert [end - start for start, end in t.image_spans] == [1, 3]
    assert fake.decode(t.input_ids[t.image_spans[1][0] - 2 : t.image_spans[1][0]]) == "b "


@pytest.mark.parametrize(("placeholders", "counts"), [(1, []), (1, [3, 3]), (0, [3]), (2, [1])])
def test_placeholder_count_mismatch(fake: CharTokenizer, placeholders: int, counts: list[int]) -> None:
    conv = [human("<image>" * placeholders + "hi"), gpt("yo")]
    message = f"has {placeholders} <image> placeholders but tokens_per_image has {len(counts)} entries"
    for name in CHAT_TEMPLATES.names():
        with pytest.raises(ValueError, match=message):
            render(conv, name, fake, counts)


def test_non_positive_image_count(fake: CharTokenizer) -> None:
    with pytest.raises(ValueError, match="positive"):
        render([human("<image>"), gpt("yo")], "llava_v1", fake, [0])


# --------------------------------------------------------------------------- all masked and other errors


@pytest.mark.parametrize("name", CHAT_TEMPLATES.names())
def test_all_labels_masked_is_loud(fake: CharTokenizer, name: str) -> None:
    with pytest.raises(AllLabelsMaskedError, match=f"all labels are masked in a '{name}' sample"):
        render([human("<image>\nWhat is it?"), gpt("")], name, fake, [2])
    assert issubclass(AllLabelsMaskedError, ValueError)
    if name != "plain":
        with pytest.raises(AllLabelsMaskedError):
            render([human("only a question")], name, fake)


def test_empty_answer_renders_the_generation_prompt(fake: CharTokenizer) -> None:
    """An empty answer is a header only (LLaVA's convention), so a later answer still trains."""
    t = render([human("Q"), gpt(""), human("R"), gpt("S")], "llava_v1", fake)
    assert t.text == f"<s>{LLAVA_V1_SYSTEM} USER: Q ASSISTANT:USER: R ASSISTANT: S</s>"
    assert [fake.decode(run) for run in trained_runs(t)] == [" S</s>"]


def test_bad_input_errors(fake: CharTokenizer) -> None:
    with pytest.raises(KeyError, match="unknown chat template 'nope'.*llava_v1"):
        render(TWO_TURNS, "nope", fake, [1])
    with pytest.raises(ValueError, match="turn 1: unknown role 'bot'"):
        render([human("a"), {"from": "bot", "value": "b"}], "llava_v1", fake)
    with pytest.raises(TypeError, match="turn 0: 'value' must be a string"):
        render([{"from": "human", "value": None}], "llava_v1", fake)
    assert get_template("vicuna_v1") == get_template("llava_v1")
    assert (
        render(TWO_TURNS, get_template("chatml"), fake, [1]).text
        == render(TWO_TURNS, "chatml", fake, [1]).text
    )


# --------------------------------------------------------------------------- truncation


def test_truncate_never_cuts_an_image(fake: CharTokenizer) -> None:
    conv = [human("<image>\nQ?"), gpt("Yes."), human("<image>\nR?"), gpt("No.")]
    t = render(conv, "llava_v1", fake, [4, 6])
    (s1, e1), (s2, e2) = t.image_spans
    assert truncate(t, len(t.input_ids)) is t
    # A cut inside the second image moves before it; the second image is dropped.
    for max_length in (s2 + 1, e2 - 1):
        cut = truncate(t, max_length)
        assert cut is not None
        assert cut.input_ids == t.input_ids[:s2] and cut.labels == t.labels[:s2]
        assert cut.image_spans == [(s1, e1)] and cut.truncated_from == len(t.input_ids)
    # A cut right after an image keeps it.
    kept = truncate(t, e2)
    assert kept is not None and kept.image_spans == t.image_spans and len(kept.input_ids) == e2
    # A cut past the image but inside the text is exact.
    exact = truncate(t, e2 + 2)
    assert exact is not None and len(exact.input_ids) == e2 + 2


def test_truncate_drops_samples_whose_first_image_does_not_fit(fake: CharTokenizer) -> None:
    t = render([human("<image>\nQ?"), gpt("Yes.")], "llava_v1", fake, [50])
    start, end = t.image_spans[0]
    assert truncate(t, end - 1) is None
    assert truncate(t, start + 1) is None
    with pytest.raises(ValueError, match="positive"):
        truncate(t, 0)


def test_truncate_that_removes_every_answer_is_loud(fake: CharTokenizer) -> None:
    t = render([human("<image>\nQ?"), gpt("Yes.")], "llava_v1", fake, [2])
    first_trained = next(i for i, label in enumerate(t.labels) if label != IGNORE_INDEX)
    with pytest.raises(AllLabelsMaskedError, match="after truncating"):
        truncate(t, first_trained)
    short = truncate(t, first_trained + 1)
    assert short is not None and short.num_trained == 1


# --------------------------------------------------------------------------- sentencepiece


def _load_tool():
    spec = importlib.util.spec_from_file_location("train_tokenizer", ROOT / "tools" / "train_tokenizer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sp(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    pytest.importorskip("sentencepiece")
    tmp = tmp_path_factory.mktemp("sp_templates")
    text = "the a cat sat on mat what is capital of France Germany Paris Berlin and describe image briefly"
    words = [*text.split(), "user", "assistant", "system", "USER", "ASSISTANT", "compare", "them", "same"]
    rng = random.Random(0)
    lines = [
        LLAVA_V1_SYSTEM,
        QWEN_SYSTEM,
        "USER: hi ASSISTANT: yes.",
        "A: b: c:",
        Q1.replace("<image>\n", ""),
        Q2,
        "Paris.",
        "Berlin.",
        "A cat sat on the mat.",
    ]
    lines += [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + "." for _ in range(300)]
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    symbols = ",".join(["<image>", "<pad>", *CHAT_TOKENS])
    args = ["--input", str(corpus), "--model-prefix", str(tmp / "tok"), "--vocab-size", "250"]
    assert _load_tool().main([*args, "--user-defined-symbols", symbols]) == 0
    return load_tokenizer(tmp / "tok.model")


@pytest.mark.parametrize("name", CHAT_TEMPLATES.names())
def test_sentencepiece_trained_positions_are_the_answers(sp: Tokenizer, name: str) -> None:
    t = render(sample_for(name), name, sp, [3])
    assert 0 not in t.input_ids  # no <unk>: the corpus covers the text
    for chat_token in CHAT_TOKENS:
        if chat_token in t.text:
            assert sp.token_id(chat_token) in t.input_ids  # a single id, not characters
    answers = ["A cat sat on the mat."] if name == "plain" else ["Paris.", "Berlin."]
    runs = trained_runs(t)
    end_token = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "qwen2_vl": "<|im_end|>",
                 "internvl": "<|im_end|>"}.get(name)
    end_id = sp.eos_id if end_token is None else sp.token_id(end_token)
    assert [run[-1] for run in runs] == [end_id] * len(answers)
    assert [sp.decode(run[:-1]).strip() for run in runs] == answers
    if name == "plain":  # the caption is the first text piece: standalone, with the dummy prefix
        assert runs[0][:-1] == sp.encode(answers[0])
    elif name in ("llava_v1", "vicuna_v1", "mistral"):  # the space before the answer is in its first token
        assert [run[:-1] for run in runs] == [sp.encode_piece(" " + a) for a in answers]
    else:
        assert [run[:-1] for run in runs] == [sp.encode_piece(a) for a in answers]
    start, end = t.image_spans[0]
    assert t.input_ids[start:end] == [sp.image_token_id] * 3 and t.input_ids.count(sp.image_token_id) == 3


def test_sentencepiece_llava_v1_ids_are_the_spans(sp: Tokenizer) -> None:
    """The ids are the spans' encodings: encode for the system prompt, encode_piece for every continuation."""
    t = render([human("<image>\nWhat is the capital of France?"), gpt("Paris.")], "llava_v1", sp, [2])
    expected = [sp.bos_id, *sp.encode(LLAVA_V1_SYSTEM), *sp.encode_piece(" USER: "), sp.image_token_id]
    expected += [sp.image_token_id, *sp.encode_piece("\nWhat is the capital of France?")]
    expected += [*sp.encode_piece(" ASSISTANT:"), *sp.encode_piece(" Paris."), sp.eos_id]
    assert t.input_ids == expected
    # Encoding each piece standalone would put a dummy-prefix space in front of "ASSISTANT:" twice.
    assert sp.decode(t.input_ids).endswith("ASSISTANT: Paris.")
