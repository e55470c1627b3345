"""The data path from files to microbatches: sample building, bad samples, the sharded resumable
loader, padded vs packed batches (same losses), and the data flags of the training config."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from megamm.config.constants import IGNORE_INDEX
from megamm.data.batching import packed_microbatches, padded_microbatches
from megamm.data.datasets import build_source, open_source, parse_data_path
from megamm.data.loader import LoaderStats, PositionDataset, RankLoader, rank_positions
from megamm.data.samples import ImageSettings, SampleBuilder
from megamm.data.sources import BadSample, BlendedSource, CaptionSource, LlavaJsonSource, Record
from megamm.data.tokenizer import load_tokenizer
from megamm.models.llava import LlavaModel
from megamm.parallel.state import ParallelState
from tests.data_fixtures import SEQ_LENGTH, DatasetFiles, model_for, write_dataset

TOKENS_PER_TILE = 16
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> DatasetFiles:
    return write_dataset(tmp_path_factory.mktemp("clean"), rows=24)


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory: pytest.TempPathFactory) -> DatasetFiles:
    return write_dataset(tmp_path_factory.mktemp("corrupt"), rows=24, corrupt=True)


def _builder(files: DatasetFiles, max_tiles: int = 1, seq_length: int = SEQ_LENGTH) -> SampleBuilder:
    tokenizer = load_tokenizer(files.tokenizer)
    return SampleBuilder(tokenizer, "plain", ImageSettings(16, max_tiles=max_tiles), TOKENS_PER_TILE, seq_length)


def _dataset(files: DatasetFiles, seed: int = 3, **kwargs) -> PositionDataset:
    return PositionDataset(open_source(str(files.train), str(files.images)), _builder(files, **kwargs), seed)


# ---------------------------------------------------------------------------------- samples


def test_sample_layout(clean: DatasetFiles) -> None:
    source = open_source(str(clean.train), str(clean.images))
    builder = _builder(clean)
    image_id = builder.tokenizer.image_token_id
    for index in range(len(source)):
        record = source[index]
        sample = builder.build(record)
        ids, labels = torch.tensor(sample.input_ids), torch.tensor(sample.labels)
        assert len(ids) == len(labels) <= SEQ_LENGTH
        image_positions = ids == image_id
        assert int(image_positions.sum()) == TOKENS_PER_TILE * len(record.images)
        assert (labels[image_positions] == IGNORE_INDEX).all()
        assert (labels != IGNORE_INDEX).any()
        assert sample.pixel_values.shape == (len(record.images), 3, 16, 16)
        trained = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
        answer = record.conversations[-1]["value"]
        assert builder.tokenizer.decode(trained).strip().startswith(answer)


def test_tiling_expands_the_placeholder(tmp_path: Path, clean: DatasetFiles) -> None:
    Image.new("RGB", (64, 32), (10, 200, 10)).save(tmp_path / "wide.png")
    record = Record("mem", 0, "wide", [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "green"}],
                    [str(tmp_path / "wide.png")])
    sample = _builder(clean, max_tiles=4, seq_length=200).build(record)
    # 64x32 -> a 2x1 grid of 16 px tiles plus a thumbnail: 3 tower inputs.
    assert sample.grids == [(2, 1)] and sample.tiles_per_image == [3]
    assert sample.pixel_values.shape == (3, 3, 16, 16)
    image_id = load_tokenizer(clean.tokenizer).image_token_id
    assert sample.input_ids.count(image_id) == 3 * TOKENS_PER_TILE


def test_truncation_keeps_whole_images_and_drops_too_long(tmp_path: Path, clean: DatasetFiles) -> None:
    for name in ("a", "b"):
        Image.new("RGB", (16, 16), (200, 0, 0)).save(tmp_path / f"{name}.png")
    turns = [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "red"}]
    record = Record("mem", 0, "two", turns, [str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    # First image ends at token 17 (BOS + 16); the second would end at 33+: a cut at 30 drops it.
    with pytest.raises(BadSample) as raised:
        _builder(clean, seq_length=30).build(record)
    assert raised.value.kind == "all_masked"  # the answer was after the second image
    with pytest.raises(BadSample) as raised:
        _builder(clean, seq_length=10).build(record)
    assert raised.value.kind == "too_long" and "id 'two'" in str(raised.value)
    sample = _builder(clean, seq_length=60).build(record)
    assert sample.pixel_values.shape[0] == 2


def test_each_corruption_is_a_named_bad_sample(corrupted: DatasetFiles) -> None:
    source = open_source(str(corrupted.train), str(corrupted.images))
    builder = _builder(corrupted)
    found: dict[str, list[str]] = {}
    for index in range(len(source)):
        try:
            builder.build(source[index])
        except BadSample as error:
            found.setdefault(error.kind, []).append(str(error))
    assert {kind: len(messages) for kind, messages in found.items()} == corrupted.corrupted
    text = "\n".join(m for messages in found.values() for m in messages)
    for needle in ("nope.png", "truncated.png", "outside image root", "decompression bomb", "malformed JSON",
                   "all labels are masked", str(corrupted.train)):
        assert needle in text, needle


# ---------------------------------------------------------------------------------- loader


def _positions_read(dataset: PositionDataset, dp: int, global_batch: int, iterations: int, workers: int = 0):
    read = []
    for rank in range(dp):
        loader = RankLoader(dataset, global_batch, rank, dp, 0, iterations, num_workers=workers)
        read.append([[s.sample_id for s in samples] for samples in loader])
    return read


def test_dp_shards_cover_an_epoch_once(clean: DatasetFiles) -> None:
    dataset = _dataset(clean)
    n = len(dataset)  # 24 records: 3 iterations of 8 = one epoch
    read = _positions_read(dataset, dp=2, global_batch=8, iterations=3)
    ids = [i for rank in read for step in rank for i in step]
    assert len(ids) == n and len(set(ids)) == n
    assert set(read[0][0]).isdisjoint(read[1][0])
    # The next epoch is a different order of the same records.
    second = [dataset[p].sample.sample_id for p in range(n, 2 * n)]
    assert sorted(second) == sorted(ids) and second != [dataset[p].sample.sample_id for p in range(n)]


def test_loader_is_deterministic_and_workers_change_nothing(clean: DatasetFiles) -> None:
    single = _positions_read(_dataset(clean), dp=2, global_batch=4, iterations=5)
    again = _positions_read(_dataset(clean), dp=2, global_batch=4, iterations=5, workers=2)
    assert single == again
    assert _positions_read(_dataset(clean, seed=4), dp=2, global_batch=4, iterations=5) != single


def test_resume_reads_what_the_uninterrupted_run_reads(clean: DatasetFiles) -> None:
    dataset = _dataset(clean)
    full = list(RankLoader(dataset, 6, 1, 2, 0, 7, num_workers=1))
    resumed = list(RankLoader(dataset, 6, 1, 2, 4, 7, num_workers=1))
    assert [[s.sample_id for s in it] for it in resumed] == [[s.sample_id for s in it] for it in full[4:]]
    for a, b in zip(resumed[-1], full[-1]):
        assert a.input_ids == b.input_ids and torch.equal(a.pixel_values, b.pixel_values)
    assert rank_positions(4, 6, 1, 2) == [27, 28, 29]


def test_bad_samples_are_replaced_deterministically_and_counted(corrupted: DatasetFiles) -> None:
    dataset = _dataset(corrupted)
    n = len(dataset)
    loader = RankLoader(dataset, n, 0, 1, 0, 1, num_workers=2, log=lambda _: None)
    samples = next(loader)
    assert len(samples) == n
    stats = loader.stats
    # Every record is read once as its own position; each bad one adds a replacement read.
    assert stats.bad >= sum(corrupted.corrupted.values())
    assert stats.records - stats.bad == n
    assert {k: v for k, v in stats.reasons.items() if v}.keys() == corrupted.corrupted.keys()
    again = next(RankLoader(dataset, n, 0, 1, 0, 1, log=lambda _: None))
    assert [s.sample_id for s in again] == [s.sample_id for s in samples]


def test_mostly_bad_data_stops_with_the_counts() -> None:
    stats = LoaderStats(records=100, bad=60)
    stats.reasons["image"] = 60
    with pytest.raises(RuntimeError, match=r"60 of 100 .*'image': 60"):
        stats.check(0.5, 100)
    LoaderStats(records=99, bad=99).check(0.5, 100)  # too few records to judge yet


# ---------------------------------------------------------------------------------- sources


def test_data_path_forms_and_source_kinds(clean: DatasetFiles, tmp_path: Path) -> None:
    train = str(clean.train)
    assert parse_data_path([train]) == [(1.0, train)]
    assert parse_data_path(["0.3", train, "0.7", train]) == [(0.3, train), (0.7, train)]
    for bad in (["0.3", train, "0.7"], [train, "0.5"], ["x", "0.5"]):
        with pytest.raises(ValueError, match="--data-path"):
            parse_data_path(bad)
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"image": "img0.png", "caption": "red"}\n')
    assert isinstance(open_source(str(captions), str(clean.images)), CaptionSource)
    assert isinstance(open_source(train, str(clean.images)), LlavaJsonSource)
    blended, parts = build_source(["1", train, "3", str(captions)], str(clean.images), 0, 40)
    assert isinstance(blended, BlendedSource) and len(blended) == 40 and len(parts) == 2
    kinds = [blended[i].kind for i in range(40)]
    assert kinds.count("caption") == 30
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_source(str(tmp_path / "missing.json"), None)


# ---------------------------------------------------------------------------------- batches


def test_packed_rows_give_the_padded_losses(clean: DatasetFiles) -> None:
    """Same samples, padded (one per row) vs packed (several per row): the same per-token losses."""
    dataset = _dataset(clean)
    samples = [dataset[p].sample for p in range(12)]
    pad_id = dataset.builder.tokenizer.pad_id
    padded = padded_microbatches(samples, 4, SEQ_LENGTH, pad_id, (3, 16, 16))
    packed = packed_microbatches(samples, 2, SEQ_LENGTH, pad_id, (3, 16, 16), microbatch_multiple=2)
    rows = sum(b["input_ids"].shape[0] for b in packed)
    assert rows % 4 == 0 and rows < len(samples)
    assert sum(int(b["images_per_sample"].sum()) for b in packed) == sum(s.num_images for s in samples)
    config = model_for(clean.tokenizer)
    model = LlavaModel(config, ParallelState.single())
    model.initialize(5)
    model.eval()

    def totals(batches) -> tuple[float, int]:
        loss, tokens = 0.0, 0
        for batch in batches:
            with torch.no_grad():
                out = model(**batch)
            loss += float(out["loss"].double().sum())
            tokens += int(out["loss_mask"].sum())
        return loss, tokens

    padded_loss, padded_tokens = totals(padded)
    packed_loss, packed_tokens = totals(packed)
    assert packed_tokens == padded_tokens
    assert abs(packed_loss - padded_loss) / padded_loss < 1e-5


# ---------------------------------------------------------------------------------- preview tool


def test_preview_tool_marks_trained_spans_images_and_bad_samples(
    corrupted: DatasetFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("preview_sample", ROOT / "tools" / "preview_sample.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    source = open_source(str(corrupted.train), str(corrupted.images))
    bad_index = 25  # write_dataset: 24 good rows, then "missing", then "truncated"
    argv = ["--data-path", str(corrupted.train), "--image-folder", str(corrupted.images), "--tokenizer-model",
            str(corrupted.tokenizer), "--chat-template", "mistral", "--seq-length", "96", "--image-size", "16",
            "--image-tokens", "16", "--index", "0", str(bad_index), "--tokens"]
    assert tool.main(argv) == 0
    out = capsys.readouterr().out
    answer = source[0].conversations[-1]["value"]
    assert f"[[{answer}" in out and "<image x 16>" in out and "tile grid 1x1" in out
    assert "skipped by the loader (image)" in out and "truncated.png" in out
    assert out.count(" train\n") >= len(load_tokenizer(corrupted.tokenizer).encode(answer)) - 1
