"""Training on dataset files end to end: a corrupted dataset is trained through with every bad record
skipped and counted, packed rows (here through a 2-stage pipeline) train exactly like padded ones, a
global batch balanced over dp ranks trains like the contiguous split (tiles, and native-resolution
images and videos), and the native-resolution family's batches are as each pipeline stage receives
them."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from megamm.config.resolved import ResolvedConfig, resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.data.loader import ResumePoint
from megamm.data.templates import template_tokenizer
from megamm.data.tokenizer import load_tokenizer
from megamm.training.data import FileData, SyntheticData, build_sample_builder, vision_inputs
from tests.data.test_native_samples import FRAMES, full_row, write_native_files
from tests.data_fixtures import DatasetFiles, write_dataset, write_qwen_tokenizer
from tests.distributed import run_distributed
from tests.tiny import language_config, llava_config, native_vision_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "tiny_cpu.yaml")


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory: pytest.TempPathFactory) -> DatasetFiles:
    return write_dataset(tmp_path_factory.mktemp("train_corrupt"), rows=24, corrupt=True)


def _argv(files: DatasetFiles, *extra: str) -> list[str]:
    tokenizer = load_tokenizer(files.tokenizer)
    return [
        "--config", EXAMPLE, "--no-mock-data", "--data-path", str(files.train), "--image-folder", str(files.images),
        "--tokenizer-model", str(files.tokenizer), "--chat-template", "mistral", "--seq-length", "96",
        "--set", f"model.language.vocab_size={tokenizer.vocab_size}",
        "--set", f"model.language.image_token_id={tokenizer.image_token_id}",
        "--set", "model.language.transformer.num_layers=2", "--log-interval", "100", "--eval-iters", "0",
        "--lr-warmup-iters", "1",
        *extra,
    ]


def _run(argv: list[str], world_size: int) -> dict:
    from megamm.train import read_config, run

    return run(read_config(argv, world_size))


@pytest.mark.slow
def test_corrupted_dataset_trains_through_and_reports_counts(corrupted: DatasetFiles) -> None:
    # 32 rows (24 good, 8 bad), 3 steps of 12 samples: position 0..35 covers the whole first epoch,
    # so every bad row is met at least once.
    argv = _argv(corrupted, "--micro-batch-size", "2", "--global-batch-size", "12", "--train-iters", "3",
                 "--num-workers", "1", "--valid-data-path", str(corrupted.train), "--eval-iters", "1")
    figures = run_distributed(_run, 2, argv, 2)
    data = figures[0]["data"]
    assert figures[0] == figures[1]
    assert data["records"] - data["bad"] == 36
    for kind, rows in corrupted.corrupted.items():
        assert data[f"bad/{kind}"] >= rows, (kind, data)
    assert data["bad"] == sum(v for k, v in data.items() if k.startswith("bad/"))
    assert math.isfinite(figures[0]["final_loss"]) and math.isfinite(figures[0]["eval_loss"])


@pytest.mark.slow
def test_packed_pipeline_training_equals_padded(corrupted: DatasetFiles) -> None:
    common = ("--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3", "--num-workers", "0")
    padded = run_distributed(_run, 1, _argv(corrupted, *common), 1)[0]
    packed = run_distributed(
        _run, 2, _argv(corrupted, *common, "--pack-sequences", "--pipeline-model-parallel-size", "2"), 2
    )
    last = packed[1]  # the last pipeline stage reports
    for key in ("first_loss", "final_loss"):
        assert abs(last[key] - padded[key]) <= 1e-5 * abs(padded[key]), (key, last[key], padded[key])
    assert last["data"] == padded["data"]


@pytest.mark.slow
def test_resumed_run_reads_and_trains_like_an_uninterrupted_one(corrupted: DatasetFiles, tmp_path: Path) -> None:
    common = ("--micro-batch-size", "2", "--global-batch-size", "4", "--num-workers", "1",
              "--lr-decay-style", "constant", "--pack-sequences")
    whole = run_distributed(_run, 1, _argv(corrupted, *common, "--train-iters", "4"), 1)[0]
    save = str(tmp_path / "ckpt")
    run_distributed(_run, 1, _argv(corrupted, *common, "--train-iters", "2", "--save", save), 1)
    resumed = run_distributed(_run, 1, _argv(corrupted, *common, "--train-iters", "4", "--load", save), 1)[0]
    assert resumed["final_loss"] == whole["final_loss"]
    # The resumed run read only iterations 3 and 4: half of the samples, and the same bad ones.
    assert resumed["data"]["records"] - resumed["data"]["bad"] == 8


# ---------------------------------------------------------------------------------------------------
# The native-resolution (Qwen2-VL family) data path, from files to each stage's microbatches. The model
# config is set on a resolved config directly: LlavaConfig refuses a native tower until the model
# takes it, and what is tested here is the data side alone.


def _native_config(root: Path, tokenizer, **training) -> ResolvedConfig:
    base = resolve(RunConfig(model=llava_config(), training=TrainingConfig(mock_data=True)), 1)
    language = replace(language_config(), vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_token_id)
    model = llava_config(vision=native_vision_config(windows=True), language=language)
    flags = {"mock_data": False, "data_path": [str(root / "rows.jsonl")], "image_folder": str(root),
             "tokenizer_model": str(root / "tokenizer.json"), "chat_template": "qwen2_vl", "seq_length": 640,
             "global_batch_size": 3, "micro_batch_size": 3, "train_iters": 1, "num_workers": 0,
             "min_pixels": 64 * 4, "max_pixels": 64 * 40, "video_min_pixels": 64 * 4, "video_max_pixels": 64 * 12,
             **training}
    run = replace(base.run, model=model, training=replace(base.run.training, **flags))
    return replace(base, run=run, model=model, microbatches_per_step=1)


def _stage(first: bool, last: bool) -> SimpleNamespace:
    return SimpleNamespace(is_first_stage=first, is_last_stage=last, dp_rank=0, dp_size=1)


@pytest.fixture(scope="module")
def native_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_native_files(tmp_path_factory.mktemp("native_training"))
    rows = [full_row(), {"image": "image1.png", "conversations": [{"from": "human", "value": "<image>What?"},
                                                                   {"from": "gpt", "value": "A cat."}]},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes."}]}]
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def test_native_batches_reach_each_stage(native_root: Path) -> None:
    """Every stage of a native-resolution run gets the M-RoPE positions (padded rows too); the first
    the patches, grids and videos; the last what the FLOP count reads. The step's vision inputs are
    its grids."""
    tokenizer = template_tokenizer(native_root / "tokenizer.json", "qwen2_vl")
    config = _native_config(native_root, tokenizer)
    first_keys = {"input_ids", "pixel_values", "images_per_sample", "image_grid_thw", "pixel_values_videos",
                  "video_grid_thw", "videos_per_sample", "position_ids"}
    last_keys = {"labels", "images_per_sample", "image_grid_thw", "video_grid_thw", "videos_per_sample",
                 "position_ids"}
    expected = {(True, False): first_keys, (False, False): {"position_ids"}, (False, True): last_keys}
    for (first, last), keys in expected.items():
        (batch,) = FileData(config, _stage(first, last), ResumePoint()).microbatches(0)
        assert set(batch) == keys, (first, last)
        assert batch["position_ids"].shape == (3, 3, 640)
    whole = FileData(config, _stage(True, True), ResumePoint())
    (batch,) = whole.microbatches(0)
    assert whole.counts()["bad"] == 0
    assert batch["pixel_values"].shape[1] == 3 * 2 * 4 * 4 and batch["videos_per_sample"].sum() == 1
    grids = batch["image_grid_thw"].tolist() + batch["video_grid_thw"].tolist()
    assert vision_inputs([batch], config.model) == grids and len(grids) == 4
    assert batch["pixel_values"].shape[0] == sum(t * h * w for t, h, w in batch["image_grid_thw"].tolist())
    packed = _native_config(native_root, tokenizer, pack_sequences=True)
    (row_batch,) = FileData(packed, _stage(False, False), ResumePoint()).microbatches(0)
    assert set(row_batch) == {"position_ids", "segment_ids"}


def test_native_tokenizer_and_synthetic_data(native_root: Path, tmp_path: Path) -> None:
    """The tokenizer must hold the template's markers; --mock-data gives native batches of random sizes."""
    tokenizer = template_tokenizer(native_root / "tokenizer.json", "qwen2_vl")
    without = write_qwen_tokenizer(tmp_path / "tokenizer.json", ["Hello there."],
                                   ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"))
    config = _native_config(native_root, tokenizer, tokenizer_model=str(without))
    with pytest.raises(ValueError, match=r"has no single token for '<\|vision_start\|>', '<\|vision_end\|>', "
                                         r"'<\|video_pad\|>'"):
        build_sample_builder(config)
    synthetic = _native_config(native_root, tokenizer, mock_data=True, data_path=None, images_per_sample=2,
                               seq_length=96)
    model = replace(synthetic.model, language=language_config())  # the synthetic task's vocabulary
    synthetic = replace(synthetic, model=model, run=replace(synthetic.run, model=model))
    data = SyntheticData(synthetic, _stage(True, True), ResumePoint())
    (batch,) = data.microbatches(0)
    assert batch["position_ids"].shape == (3, 3, 96) and batch["pixel_values_videos"] is None
    grids = batch["image_grid_thw"]
    assert vision_inputs([batch], synthetic.model) == ([] if grids is None else grids.tolist())
    assert grids is not None and batch["pixel_values"].shape[0] == int(grids.prod(dim=1).sum())
    middle = SyntheticData(synthetic, _stage(False, False), ResumePoint())
    assert set(middle.microbatches(0)[0]) == {"position_ids"}
@pytest.mark.slow
def test_balanced_vision_work_trains_like_the_contiguous_split(tmp_path: Path) -> None:
    """dp=2 with dynamic tiling (0 to 4 tower inputs per sample): the balanced assignment differs
    from the contiguous split, yet the first step's loss, the per-token mean over the global batch,
    is the same to fp32 rounding."""
    from megamm.data.datasets import build_source
    from megamm.data.loader import PositionDataset, rank_positions
    from megamm.train import read_config
    from megamm.training.data import build_sample_builder, vision_work_balancer

    files = write_dataset(tmp_path, rows=24)
    common = ("--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "1", "--num-workers", "0",
              "--max-image-tiles", "4", "--seq-length", "128")
    balanced_argv = _argv(files, *common, "--balance-vision-work")
    config = read_config(balanced_argv, 2)
    t = config.training
    source, _ = build_source(t.data_path, t.image_folder, t.seed, 8)
    dataset = PositionDataset(source, build_sample_builder(config), t.seed)
    assert rank_positions(0, 8, 0, 2, balance=(vision_work_balancer(config), dataset.probe)) != rank_positions(0, 8, 0, 2)
    plain = run_distributed(_run, 2, _argv(files, *common), 2)[0]
    balanced = run_distributed(_run, 2, balanced_argv, 2)[0]
    assert abs(balanced["first_loss"] - plain["first_loss"]) <= 1e-5 * abs(plain["first_loss"])
    assert balanced["data"] == plain["data"]


NATIVE_EXAMPLE = str(ROOT / "examples" / "qwen2_vl_tiny_cpu.yaml")


def write_skewed_native(root: Path, rows: int) -> tuple[Path, Path]:
    """(rows.jsonl, tokenizer.json) of a native-resolution dataset skewed in vision tokens: of every
    four rows one holds a 64x96 image (16 x 24 patches of 4 px), one a 32x48 (8 x 12), two a 16x16
    (4 x 4); every fifth row a frame-list video instead; the tokenizer the native sample tests use."""
    write_native_files(root)
    for name, shape, color in (("big", (64, 96), (200, 40, 40)), ("middle", (32, 48), (40, 200, 40)),
                               ("small", (16, 16), (40, 40, 200))):
        Image.new("RGB", shape[::-1], color).save(root / f"{name}.png")
    lines = []
    for index in range(rows):
        row: dict = {"id": str(index), "conversations": [{"from": "human", "value": "<image>What?"},
                                                         {"from": "gpt", "value": "A cat." * (1 + index % 3)}]}
        if index % 5 == 4:
            row["video"] = FRAMES
            row["conversations"][0]["value"] = "<video>What?"
        else:
            row["image"] = ("big.png", "middle.png", "small.png", "small.png")[index % 4]
        lines.append(json.dumps(row) + "\n")
    (root / "rows.jsonl").write_text("".join(lines))
    return root / "rows.jsonl", root / "tokenizer.json"


@pytest.mark.slow
def test_balanced_native_resolution_work_trains_like_the_contiguous_split(tmp_path: Path) -> None:
    """dp=2 with native-resolution images of two sizes and videos: the probed plan moves samples off
    the contiguous split, every position of a global batch goes to one rank once, and the first
    step's loss and the data counts equal the unbalanced run's."""
    from megamm.data.datasets import build_source
    from megamm.data.loader import PositionDataset, rank_positions
    from megamm.train import read_config
    from megamm.training.data import vision_work_balancer

    data, tokenizer_path = write_skewed_native(tmp_path, rows=24)
    tokenizer = template_tokenizer(tokenizer_path, "qwen2_vl")
    argv = ["--config", NATIVE_EXAMPLE, "--no-mock-data", "--data-path", str(data), "--image-folder", str(tmp_path),
            "--tokenizer-model", str(tokenizer_path), "--chat-template", "qwen2_vl", "--seq-length", "192",
            "--set", f"model.language.vocab_size={tokenizer.vocab_size}",
            "--set", f"model.language.image_token_id={tokenizer.image_token_id}",
            "--set", f"model.language.video_token_id={tokenizer.token_id('<|video_pad|>')}",
            "--min-pixels", "256", "--max-pixels", "6144", "--video-min-pixels", "256", "--video-max-pixels", "768",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "1", "--num-workers", "0",
            "--log-interval", "1", "--eval-iters", "0", "--lr-warmup-iters", "1"]
    balanced_argv = [*argv, "--balance-vision-work"]
    config = read_config(balanced_argv, 2)
    t = config.training
    source, _ = build_source(t.data_path, t.image_folder, t.seed, 24)
    dataset = PositionDataset(source, build_sample_builder(config), t.seed)
    balance = (vision_work_balancer(config), dataset.probe)
    for iteration in range(3):
        ranks = [rank_positions(iteration, 8, rank, 2, balance=balance) for rank in range(2)]
        assert sorted(ranks[0] + ranks[1]) == list(range(8 * iteration, 8 * iteration + 8))
    assert rank_positions(0, 8, 0, 2, balance=balance) != rank_positions(0, 8, 0, 2)
    plans = [balance[0].plan(8 * iteration, 8, 2, dataset.probe) for iteration in range(3)]
    assert sum(p.imbalance.vision for p in plans) < sum(p.contiguous.vision for p in plans)
    plain = run_distributed(_run, 2, argv, 2)[0]
    balanced = run_distributed(_run, 2, balanced_argv, 2)[0]
    assert abs(balanced["first_loss"] - plain["first_loss"]) <= 1e-5 * abs(plain["first_loss"])
    assert balanced["data"] == plain["data"] and plain["data"]["bad"] == 0


def test_tile_tags_reach_the_samples_and_train(tmp_path: Path) -> None:
    """--tile-tags with the internvl template: the run's samples hold a tag before each tile's
    image tokens, and three training steps on them (one process) lower the loss."""
    from megamm.data.internvl_template import tile_tags
    from megamm.parallel.state import ParallelState
    from megamm.pipeline.chunks import build_model_chunks
    from megamm.training.step import build_trainer, train_step
    from tests.models.test_internvit import internvl_microbatches
    from tests.tiny import internvl_config

    internvl_microbatches(tmp_path)  # writes the tokenizer and three images
    tokenizer = template_tokenizer(tmp_path / "tokenizer.json", "internvl")
    vocab, image_token = tokenizer.vocab_size, tokenizer.image_token_id
    rows = [{"image": f"image{n}.png", "conversations": [{"from": "human", "value": "<image>\nDescribe it."},
                                                         {"from": "gpt", "value": "A red square."}]}
            for n in range(3)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    model = internvl_config(vocab_size=vocab, image_token_id=image_token)
    flags = {"mock_data": False, "data_path": [str(tmp_path / "rows.jsonl")], "image_folder": str(tmp_path),
             "tokenizer_model": str(tmp_path / "tokenizer.json"), "chat_template": "internvl", "max_image_tiles": 4,
             "image_aspect_ratio": "resize", "tile_tags": True, "seq_length": 96, "global_batch_size": 3,
             "micro_batch_size": 3, "train_iters": 3, "num_workers": 0, "lr": 3e-3, "lr_warmup_iters": 0,
             "clip_grad": 0.0}
    config = resolve(RunConfig(model=model, training=TrainingConfig(**flags)), 1)
    (batch,) = FileData(config, _stage(True, True), ResumePoint()).microbatches(0)
    tiles = batch["images_per_sample"].tolist()
    assert sorted(tiles) == [1, 3, 4]
    for row, count in zip(batch["input_ids"].tolist(), tiles, strict=True):
        tags = [tokenizer.token_id(tag) for tag in tile_tags(count)]
        assert [token for token in row if token in tags] == tags
        assert row.count(image_token) == count * config.model.image_tokens_per_image
    state = ParallelState.single()
    state.seed(config.training.seed)
    chunks = build_model_chunks(config, state)
    trainer = build_trainer(config, state, chunks)
    losses = [train_step(trainer, [batch], iteration).loss for iteration in range(3)]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0], losses
