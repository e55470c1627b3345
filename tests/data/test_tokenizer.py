"""megamm.data.tokenizer over both backends, and tools/train_tokenizer.py.

Everything is built here: a tiny sentencepiece model trained with the tool on generated sentences, and
tiny `tokenizers` WordLevel / BPE tokenizers constructed in code, so no model hub is needed.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("sentencepiece")
pytest.importorskip("tokenizers")

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFBackend

from megamm.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

ROOT = Path(__file__).resolve().parents[2]
# Word pool for the generated corpus (split in _sentences).
WORD_TEXT = (
    "the a an cat dog bird sat runs jumps on under over mat table chair red blue green small large "
    "picture image photo shows describe what is in this man woman child holding playing with ball "
    "USER ASSISTANT SYSTEM question answer yes no there are two three people street car bus tree sky"
)


def _load_tool() -> ModuleType:
    """tools/ is not a package: import train_tokenizer.py from its path to call main() in-process."""
    spec = importlib.util.spec_from_file_location("train_tokenizer", ROOT / "tools" / "train_tokenizer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_tokenizer = _load_tool()


def _sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pool = WORD_TEXT.split()
    out = []
    for _ in range(count):
        words = [rng.choice(pool) for _ in range(rng.randint(3, 12))]
        out.append(" ".join(words) + rng.choice([".", "?", "!", ":", ","]))
    return out


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sp")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(_sentences(400)) + "\n")
    assert (
        train_tokenizer.main(
            ["--input", str(corpus), "--model-prefix", str(tmp / "tok"), "--vocab-size", "200"]
        )
        == 0
    )
    return tmp / "tok.model"


@pytest.fixture(scope="module")
def sp(sp_model: Path) -> Tokenizer:
    return load_tokenizer(sp_model)


# --------------------------------------------------------------------------- sentencepiece


def test_train_tool_prints_size_and_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(_sentences(200)))
    train_tokenizer.main(
        ["--input", str(corpus), "--model-prefix", str(tmp_path / "sub" / "t"), "--vocab-size", "120"]
    )
    out = capsys.readouterr().out
    assert "vocab size 120" in out
    assert str(tmp_path / "sub" / "t.model") in out
    assert (tmp_path / "sub" / "t.model").is_file()


def test_train_tool_is_deterministic(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(_sentences(300, seed=3)))
    args = ["--input", str(corpus), "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "150"]
    train_tokenizer.main(args)
    first = (tmp_path / "tok.model").read_bytes()
    train_tokenizer.main(args)
    assert (tmp_path / "tok.model").read_bytes() == first


def test_sp_basic_properties(sp: Tokenizer, sp_model: Path) -> None:
    assert isinstance(sp, SentencePieceTokenizer)
    # The tool reserved <image> and <pad> as user-defined pieces: no extra ids were needed.
    assert sp.vocab_size == 200
    assert (sp.bos_id, sp.eos_id) == (1, 2)
    assert sp.image_token_id == sp.token_id("<image>")
    assert sp.pad_id == sp.token_id("<pad>")
    assert len({sp.image_token_id, sp.pad_id, sp.bos_id, sp.eos_id, 0}) == 5
    assert {0, 1, 2, sp.image_token_id, sp.pad_id} == sp.special_ids
    with pytest.raises(KeyError, match="nonexistent_piece.*tok.model"):
        sp.token_id("nonexistent_piece")


@pytest.mark.parametrize(
    "text",
    ["the cat sat on the mat.", "USER: what is in this image? ASSISTANT: a dog", "  two  spaces ", "a"],
)
def test_sp_round_trip(sp: Tokenizer, text: str) -> None:
    ids = sp.encode(text)
    assert ids and all(0 <= i < sp.vocab_size for i in ids)
    assert not set(ids) & sp.special_ids  # no BOS/EOS, no unknowns
    assert sp.decode(ids) == text
    # decode drops the one leading space of a sequence (the dummy prefix) that encode_piece kept.
    assert sp.decode(sp.encode_piece(text)) == text.removeprefix(" ")
    assert sp.decode(sp.encode("the") + sp.encode_piece(text)) == "the" + text


def test_sp_image_token_in_text(sp: Tokenizer) -> None:
    assert sp.encode("<image>") == [sp.image_token_id]
    ids = sp.encode("describe <image> the photo")
    assert ids.count(sp.image_token_id) == 1
    assert sp.decode(ids) == "describe <image> the photo"
    assert sp.encode_piece("<image>") == [sp.image_token_id]


def test_sp_prefix_space_semantics(sp: Tokenizer) -> None:
    """encode adds the dummy prefix space, encode_piece never does and keeps the span's own spaces."""
    assert sp._sp.id_to_piece(sp.encode("the")[0]) == "▁the"  # type: ignore[attr-defined]
    assert sp.encode_piece(" the") == sp.encode("the")
    assert sp.encode_piece("the") != sp.encode("the")
    head = sp.encode("USER:")
    assert sp.decode(head + sp.encode_piece(" what is")) == "USER: what is"
    assert sp.decode(head + sp.encode_piece("cat")) == "USER:cat"
    assert sp.decode(head + sp.encode_piece("  two")) == "USER:  two"


def test_sp_adds_missing_special_tokens_as_extra_ids(sp_model: Path) -> None:
    tok = load_tokenizer(sp_model, image_token="<img>", pad_token="[PAD]")
    assert tok.vocab_size == 202
    assert (tok.image_token_id, tok.pad_id) == (200, 201)
    assert tok.token_id("<img>") == 200 and tok.token_id("[PAD]") == 201
    assert {200, 201} <= tok.special_ids
    text = "the <img>cat [PAD] sat"
    ids = tok.encode(text)
    assert ids.count(200) == 1 and ids.count(201) == 1
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("<img> the dog")) == "<img> the dog"
    assert tok.decode(tok.encode("the") + tok.encode_piece(" <img> dog")) == "the <img> dog"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([202])


def test_sp_model_with_its_own_pad_piece(tmp_path: Path) -> None:
    """A model trained with pad_id keeps that pad; only the image token becomes an extra id."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences(200)),
        model_prefix=str(tmp_path / "p"),
        vocab_size=100,
        model_type="bpe",
        pad_id=3,
        pad_piece="[PAD]",
        minloglevel=2,
    )
    tok = load_tokenizer(tmp_path / "p.model")
    assert (tok.pad_id, tok.pad_token) == (3, "[PAD]")
    assert (tok.image_token_id, tok.vocab_size) == (100, 101)
    assert tok.encode("cat [PAD]")[-1] == 3
    assert {0, 1, 2, 3, 100} == tok.special_ids


# --------------------------------------------------------------------------- train tool inputs


def test_train_tool_reads_llava_jsonl_and_json(tmp_path: Path) -> None:
    records = [
        {
            "id": str(i),
            "image": "x.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\n" + s},
                {"from": "gpt", "value": "zebra " + s},
            ],
        }
        for i, s in enumerate(_sentences(150, seed=5))
    ]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    as_json = tmp_path / "data.json"
    as_json.write_text(json.dumps(records[:2]))

    sentences = list(train_tokenizer.read_sentences(as_json))
    assert sentences[0] == records[0]["conversations"][0]["value"].removeprefix("<image>\n")
    assert sentences[1] == "zebra " + records[0]["conversations"][0]["value"].removeprefix("<image>\n")
    assert len(sentences) == 4 and not any("<image>" in s for s in sentences)

    prefix = tmp_path / "tok"
    args = [
        "--input",
        str(jsonl),
        "--model-prefix",
        str(prefix),
        "--vocab-size",
        "150",
        "--user-defined-symbols",
        "",
    ]
    train_tokenizer.main(args)
    tok = load_tokenizer(f"{prefix}.model", image_token="<image>")
    base = tok._sp  # type: ignore[attr-defined]
    # The placeholder was stripped from the corpus: its characters never became pieces ...
    assert base.piece_to_id("<") == base.unk_id() and base.piece_to_id(">") == base.unk_id()
    # ... so the image and pad tokens are extra ids, while the conversation text encodes without <unk>.
    assert (tok.image_token_id, tok.pad_id, tok.vocab_size) == (150, 151, 152)
    assert base.unk_id() not in tok.encode("zebra " + _sentences(1, seed=5)[0])


def _conversation(text: str, image: str | None = "x.jpg") -> dict:
    placeholder = "<image>\n" if image else ""
    row: dict = {"conversations": [{"from": "human", "value": placeholder + text},
                                   {"from": "gpt", "value": "zebra " + text}]}
    if image:
        row["image"] = image
    return row


# Bad rows of every kind a conversation file can have, with the kind the training reader gives each.
BAD_ROWS = [
    ("{not json", "json"),
    ("[1, 2]", "schema"),  # a row that is not an object
    (json.dumps({"text": "no conversations"}), "schema"),
    (json.dumps({"conversations": [{"from": "human"}]}), "schema"),  # a turn without a value
    (json.dumps(_conversation("two images", image=None) | {"images": ["a.jpg", "b.jpg"]}), "placeholders"),
]


def test_train_tool_skips_and_counts_bad_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = [json.dumps(_conversation(s)) for s in _sentences(150, seed=7)]
    bad = [row for row, _ in BAD_ROWS] + ["{also not json"]
    lines = good[:40] + bad[:3] + good[40:90] + bad[3:] + good[90:]
    dirty = tmp_path / "dirty.jsonl"
    dirty.write_text("\n".join(lines) + "\n")
    text = tmp_path / "extra.txt"
    text.write_bytes(b"the cat sat on the mat.\n\xff\xfe not utf-8\nthe dog runs.\r\n")
    prefix = str(tmp_path / "tok")
    args = ["--model-prefix", prefix, "--vocab-size", "150"]
    assert train_tokenizer.main(["--input", str(dirty), str(text), *args]) == 0
    out, err = capsys.readouterr()
    assert f"  {dirty}: 156 records read, 6 bad skipped (json 2, placeholders 1, schema 3)" in out.splitlines()
    assert f"  {text}: 3 records read, 1 bad skipped (encoding 1)" in out.splitlines()
    assert "from 159 records (7 bad skipped)" in out
    assert f"skipping bad sample (json): {dirty}: row 40: malformed JSON line" in err
    assert f"skipping bad sample (encoding): {text}: line 2: not UTF-8 text" in err
    # Five bad records of a file are printed, the rest only counted.
    assert err.count("skipping bad sample") == 6 and err.count("further bad records are counted") == 1
    assert f"{dirty}: further bad records are counted" in err and "also not json" not in err
    dirty_model = Path(f"{prefix}.model").read_bytes()
    # The good rows alone give the same model: nothing of the bad rows was used, nothing good was lost.
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(good) + "\n")
    text.write_bytes(b"the cat sat on the mat.\nthe dog runs.\n")
    assert train_tokenizer.main(["--input", str(clean), str(text), *args]) == 0
    assert f"  {clean}: 150 records read, 0 bad skipped (none)" in capsys.readouterr().out.splitlines()
    assert Path(f"{prefix}.model").read_bytes() == dirty_model


def test_train_tool_stops_when_most_records_are_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small = tmp_path / "small.jsonl"  # fewer than 100 records: judged at the end of the file
    small.write_text("\n".join([json.dumps(_conversation(s)) for s in _sentences(3)] + [r for r, _ in BAD_ROWS]))
    args = ["--model-prefix", str(tmp_path / "t"), "--vocab-size", "40"]
    assert train_tokenizer.main(["--input", str(small), *args]) == 2
    err = capsys.readouterr().err
    assert (f"train_tokenizer.py: {small}: 5 of 8 records read are bad, more than --max-bad-sample-fraction 0.5 "
            "(json 1, placeholders 1, schema 3); first bad record (json): ") in err
    assert not (tmp_path / "t.model").exists()
    assert train_tokenizer.main(["--input", str(small), *args, "--max-bad-sample-fraction", "0.7"]) == 0
    capsys.readouterr()
    # Past 100 records the check runs as they are read; here in the second file, while sentencepiece
    # pulls the sentences: the error still comes out as it is.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_sentences(50)))
    big = tmp_path / "big.jsonl"  # two rows of three bad
    big.write_text("\n".join(json.dumps(_conversation(s)) if i % 3 == 0 else "{" for i, s in enumerate(_sentences(300))))
    assert train_tokenizer.main(["--input", str(corpus), str(big), "--model-prefix", str(tmp_path / "u"),
                                 "--vocab-size", "40"]) == 2
    err = capsys.readouterr().err
    assert f"train_tokenizer.py: {big}: 66 of 100 records read are bad, more than --max-bad-sample-fraction" in err
    assert "INTERNAL" not in err and not (tmp_path / "u.model").exists()
    # 0: any bad record stops it.
    assert train_tokenizer.main(["--input", str(small), *args, "--max-bad-sample-fraction", "0"]) == 2
    with pytest.raises(SystemExit):
        train_tokenizer.main(["--input", str(small), *args, "--max-bad-sample-fraction", "1.5"])
    assert "--max-bad-sample-fraction: must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_train_tool_rejects_non_conversation_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no conversations"}\n')
    args = ["--model-prefix", str(tmp_path / "t"), "--vocab-size", "50"]
    assert train_tokenizer.main(["--input", str(bad), *args]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: 1 of 1 records read are bad" in err and "'conversations' must be a non-empty list" in err
    broken = tmp_path / "broken.json"
    broken.write_text('[{"conversations": ')
    assert train_tokenizer.main(["--input", str(broken), *args]) == 2
    assert f"{broken} is not valid JSON" in capsys.readouterr().err
    missing = tmp_path / "missing.txt"
    assert train_tokenizer.main(["--input", str(bad), str(missing), *args]) == 2
    assert f"input file(s) not found: {missing}" in capsys.readouterr().err


def test_train_tool_reads_one_record_json(tmp_path: Path) -> None:
    one = tmp_path / "one.json"
    one.write_text(json.dumps(_conversation("the cat sat"), indent=2))
    assert list(train_tokenizer.read_sentences(one)) == ["the cat sat", "zebra the cat sat"]


# --------------------------------------------------------------------------- tokenizers (HF)

HF_WORDS = ["[UNK]", "the", "cat", "sat", "on", "mat", "dog"]


def _word_level(path: Path, extra: tuple[str, ...] = (), special: tuple[str, ...] = ()) -> Path:
    tok = HFBackend(models.WordLevel({w: i for i, w in enumerate([*HF_WORDS, *extra])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if special:
        tok.add_special_tokens([AddedToken(t, special=True) for t in special])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def test_hf_adds_missing_special_tokens(tmp_path: Path) -> None:
    tok = load_tokenizer(_word_level(tmp_path / "w").parent)  # a directory holding tokenizer.json
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == len(HF_WORDS) + 2
    assert {tok.image_token_id, tok.pad_id} == {len(HF_WORDS), len(HF_WORDS) + 1}
    assert tok.image_token_id == tok.token_id("<image>") and tok.pad_id == tok.token_id("<pad>")
    assert tok.bos_id is None and tok.eos_id is None
    assert tok.special_ids == {tok.image_token_id, tok.pad_id}
    ids = tok.encode("the cat <image> sat on <pad>")
    assert ids == [1, 2, tok.image_token_id, 3, 4, tok.pad_id]
    assert all(i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == "the cat <image> sat on <pad>"
    assert tok.encode_piece("<image> dog") == [tok.image_token_id, 6]
    with pytest.raises(KeyError, match="zebra"):
        tok.token_id("zebra")


def test_hf_special_tokens_not_duplicated(tmp_path: Path) -> None:
    # Present as plain vocabulary entries: reused, made special (so "<image>" is not split by the
    # Whitespace pre-tokenizer into "<", "image", ">").
    plain = load_tokenizer(_word_level(tmp_path / "plain", extra=("<image>", "<pad>")))
    assert plain.vocab_size == len(HF_WORDS) + 2
    assert (plain.image_token_id, plain.pad_id) == (len(HF_WORDS), len(HF_WORDS) + 1)
    assert plain.encode("cat <image>") == [2, len(HF_WORDS)]
    # Present as added special tokens, with BOS/EOS: nothing added, BOS/EOS found by their common names.
    added = load_tokenizer(_word_level(tmp_path / "added", special=("<s>", "</s>", "<image>", "<pad>")))
    assert added.vocab_size == len(HF_WORDS) + 4
    assert (added.bos_id, added.eos_id) == (len(HF_WORDS), len(HF_WORDS) + 1)
    assert (added.image_token_id, added.pad_id) == (len(HF_WORDS) + 2, len(HF_WORDS) + 3)
    assert added.special_ids == set(range(len(HF_WORDS), len(HF_WORDS) + 4))
    assert added.encode("cat") == [2]  # no BOS/EOS added by encode


def test_hf_bos_eos_explicit_and_from_config(tmp_path: Path) -> None:
    path = _word_level(tmp_path / "cfg", special=("<|im_start|>", "<|end|>"))
    assert load_tokenizer(path).eos_id is None
    assert load_tokenizer(path, eos_token="<|end|>").eos_id == len(HF_WORDS) + 1
    with pytest.raises(KeyError, match="eos token '<nope>'"):
        load_tokenizer(path, eos_token="<nope>")
    (path.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|end|>"}}))
    tok = load_tokenizer(path)
    assert (tok.bos_id, tok.eos_id) == (len(HF_WORDS), len(HF_WORDS) + 1)


def test_hf_bpe_metaspace_prefix_space(tmp_path: Path) -> None:
    bpe = HFBackend(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]", "<s>", "</s>"], show_progress=False)
    bpe.train_from_iterator(_sentences(200), trainer)
    bpe.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.vocab_size == bpe.get_vocab_size() + 2
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
    assert tok.encode_piece(" the") == tok.encode("the")  # Metaspace "first" prefix suppressed
    assert tok.encode_piece("the") != tok.encode("the")
    assert tok.decode(tok.encode("USER:") + tok.encode_piece(" the cat")) == "USER: the cat"


# --------------------------------------------------------------------------- errors


def test_load_errors_name_the_path(tmp_path: Path, sp_model: Path) -> None:
    missing = tmp_path / "missing.model"
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)  # a directory without a tokenizer
    unknown = tmp_path / "vocab.txt"
    unknown.write_text("a\nb\n")
    with pytest.raises(ValueError, match="unknown tokenizer format.*vocab.txt"):
        load_tokenizer(unknown)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\xff\x00 not a model")
    with pytest.raises(ValueError, match="corrupt.model"):
        load_tokenizer(corrupt)
    corrupt_json = tmp_path / "bad" / "tokenizer.json"
    corrupt_json.parent.mkdir()
    corrupt_json.write_text('{"model": 1')
    with pytest.raises(ValueError, match="bad/tokenizer.json"):
        load_tokenizer(corrupt_json)
