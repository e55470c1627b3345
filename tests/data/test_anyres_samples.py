"""Any-resolution (LLaVA-NeXT) samples through the data pipeline: each image is tiled at the model's
pinpoints (base image + tiles), its placeholder expands to the token count of its own size, labels
are built span by span (image positions never trained), the header-only probe gives the build's
counts, and padded and packed microbatches carry every image's size, counting images (not tiles) per
row; the model accepts those microbatches (its per-sample token check is strict).

LLaVA-OneVision's multi-image rule (`single_tile_multi_image`): a record of three images of
different aspect ratios gives LlavaOnevisionImageProcessorPil's pixel values (one padded-square tile
each) and LlavaOnevisionProcessor's token counts, a record of one image its tiles; packed rows carry
the images of each sample (`batch_num_images`), which the model needs and refuses to go without.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from megamm.config import LlavaConfig
from megamm.config.anyres import AnyResConfig, image_tokens, tiles_per_image
from megamm.config.constants import IGNORE_INDEX
from megamm.data.batching import packed_microbatches, padded_microbatches
from megamm.data.samples import ImageSettings, Sample, SampleBuilder
from megamm.data.sources import BadSample, LlavaJsonSource
from megamm.data.tokenizer import load_tokenizer
from megamm.models.llava import LlavaModel
from megamm.models.towers.clip import CLIP
from megamm.parallel.state import ParallelState
from tests.data.test_anyres_images import random_image
from tests.data_fixtures import DatasetFiles, model_for, write_dataset

PINPOINTS = ((16, 32), (32, 16), (32, 32), (48, 16), (16, 48))
TILE, GRID = 16, 4
SEQ = 256
# LLaVA-OneVision's any-resolution settings: its multi-image rule, anyres_max_1.
ONEVISION = AnyResConfig(PINPOINTS, max_num_patches=1, single_tile_multi_image=True)
# (height, width) of a three-image record's images (wide, tall, square) and of a one-image record's.
MULTI_SIZES = [(20, 50), (45, 13), (30, 30)]
LONE_SIZES = [(40, 22)]


def anyres_model(files: DatasetFiles) -> LlavaConfig:
    return replace(model_for(files.tokenizer), anyres=AnyResConfig(PINPOINTS))


def build_samples(files: DatasetFiles, anyres: AnyResConfig | None = None,
                  normalization: str = "clip") -> tuple[list[Sample], SampleBuilder, LlavaJsonSource]:
    """Every record of the dataset as a sample tiled by `anyres` (default: LLaVA-NeXT's PINPOINTS)."""
    settings = ImageSettings(TILE, normalization=normalization, anyres=anyres or AnyResConfig(PINPOINTS))
    builder = SampleBuilder(load_tokenizer(files.tokenizer), "plain", settings, GRID * GRID, SEQ)
    source = LlavaJsonSource(files.train, files.images)
    return [builder.build(source[i]) for i in range(len(source))], builder, source


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> DatasetFiles:
    return write_dataset(tmp_path_factory.mktemp("anyres"), rows=12)


def test_samples_tile_and_expand_by_image_size(files: DatasetFiles) -> None:
    samples, builder, source = build_samples(files)
    image_id = load_tokenizer(files.tokenizer).image_token_id
    with_images = [s for s in samples if s.tiles_per_image]
    assert with_images and any(s.image_sizes == [] for s in samples)  # text-only rows too
    sizes_seen = set()
    for sample in with_images:
        (height, width), = sample.image_sizes
        with Image.open(files.images / f"img{sample.index}.png") as img:
            assert (img.height, img.width) == (height, width)
        sizes_seen.add((height, width))
        tiles = tiles_per_image((height, width), list(PINPOINTS), TILE)
        assert sample.tiles_per_image == [tiles] and sample.pixel_values.shape == (tiles, 3, TILE, TILE)
        (start, end), = sample.image_spans
        assert end - start == image_tokens((height, width), list(PINPOINTS), TILE, GRID)
        assert all(t == image_id for t in sample.input_ids[start:end])
        assert sum(t == image_id for t in sample.input_ids) == end - start
        assert all(label == IGNORE_INDEX for label in sample.labels[start:end])
        layout = builder.probe(source[sample.index])
        assert layout.tiles_per_image == (tiles,) and layout.tokens == len(sample)
    assert len(sizes_seen) > 1  # images of different aspect ratios


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_microbatches_carry_sizes_and_the_model_takes_them(files: DatasetFiles, packed: bool) -> None:
    samples, _, _ = build_samples(files)
    shape = (3, TILE, TILE)
    batches = (packed_microbatches(samples, 2, SEQ, 0, shape) if packed
               else padded_microbatches(samples, 2, SEQ, 0, shape))
    model = LlavaModel(anyres_model(files), ParallelState.single())
    model.initialize(3)
    images = 0
    for batch in batches:
        count = int(batch["images_per_sample"].sum())
        images += count
        if count:
            assert batch["image_sizes"].shape == (count, 2)
            assert batch["pixel_values"].shape[0] == sum(
                tiles_per_image(tuple(s), list(PINPOINTS), TILE) for s in batch["image_sizes"].tolist())
        else:
            assert batch["image_sizes"] is None and batch["pixel_values"] is None
        with torch.no_grad():
            out = model(**batch)
        assert torch.isfinite(out["loss"]).all()
    assert images == sum(len(s.image_sizes) for s in samples)


def test_a_microbatch_mixing_kinds_is_refused(files: DatasetFiles) -> None:
    samples, _, _ = build_samples(files)
    plain = replace(samples[0], image_sizes=None)
    with pytest.raises(ValueError, match="mixes any-resolution samples"):
        padded_microbatches([samples[1], plain], 2, SEQ, 0, (3, TILE, TILE))


def write_multi_image_rows(root: Path) -> Path:
    """A dataset file of two records over random-pixel images in `root`: "multi" (MULTI_SIZES) and
    "lone" (LONE_SIZES), an "<image>" placeholder per image, each followed by a question."""
    rows = []
    for sample_id, sizes in (("multi", MULTI_SIZES), ("lone", LONE_SIZES)):
        names = [f"{sample_id}{number}.png" for number in range(len(sizes))]
        for number, (name, (height, width)) in enumerate(zip(names, sizes)):
            random_image(height, width, 10 * len(rows) + number).save(root / name)
        question = " ".join(["<image> Which color do you see?"] * len(sizes))
        rows.append({"id": sample_id, "images": names,
                     "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "It is red."}]})
    path = root / "multi.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def onevision_samples(files: DatasetFiles, anyres: AnyResConfig = ONEVISION
                      ) -> tuple[list[Sample], SampleBuilder, LlavaJsonSource]:
    """The multi-image and the one-image record (`write_multi_image_rows`) as samples of `anyres` (a
    multi-image rule)."""
    return build_samples(replace(files, train=write_multi_image_rows(files.images)), anyres)


def onevision_processors() -> tuple[LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor]:
    """LlavaOnevisionImageProcessorPil with ONEVISION's tiles, pinpoints and CLIP's statistics, and a
    LlavaOnevisionProcessor over it for its token rule (`replace_image_token`; built without
    `__init__`, which needs a video processor and a tokenizer the rule does not read)."""
    images = LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_mean=CLIP.image_mean,
                                             image_std=CLIP.image_std,
                                             image_grid_pinpoints=[list(p) for p in PINPOINTS])
    processor = object.__new__(LlavaOnevisionProcessor)
    vars(processor).update(image_processor=images, num_image_tokens=GRID * GRID, image_token="<image>",
                           vision_feature_select_strategy="full",
                           vision_aspect_ratio=f"anyres_max_{ONEVISION.max_num_patches}")
    return images, processor


def test_onevision_samples_match_the_processor(files: DatasetFiles) -> None:
    """Each image of the three-image sample is one tower input with the processor's pixels (the image
    padded to a square with the mean color, resized) and its g^2 + 1 tokens; the one-image sample's
    image keeps its tiles; the probe gives the build's counts."""
    samples, builder, source = onevision_samples(files)
    image_processor, processor = onevision_processors()
    for sample, sizes in zip(samples, (MULTI_SIZES, LONE_SIZES), strict=True):
        images = [Image.open(path).convert("RGB") for path in source[sample.index].images]
        assert [(img.height, img.width) for img in images] == sizes == sample.image_sizes
        out = image_processor(images=[images], return_tensors="pt")
        assert out["batch_num_images"].tolist() == [len(images)]
        inputs = [1] * len(images) if len(images) > 1 else [tiles_per_image(sizes[0], list(PINPOINTS), TILE)]
        assert sample.tiles_per_image == inputs
        expected = torch.cat([pixels[:count] for pixels, count in zip(out["pixel_values"], inputs)])
        torch.testing.assert_close(sample.pixel_values, expected, rtol=0, atol=1e-6, msg=sample.sample_id)
        tokens = [len(processor.replace_image_token(out, i)) // len("<image>") for i in range(len(images))]
        assert [end - start for start, end in sample.image_spans] == tokens, sample.sample_id
        layout = builder.probe(source[sample.index])
        assert layout.tiles_per_image == tuple(inputs) and layout.tokens == len(sample)
    assert [end - start for start, end in samples[0].image_spans] == [GRID * GRID + 1] * len(MULTI_SIZES)


def test_packed_onevision_rows_carry_the_images_of_each_sample(files: DatasetFiles) -> None:
    """A packed row of the three-image and the one-image sample: batch_num_images [3, 1] (its
    images_per_sample is 4); the model takes the row, and refuses it without batch_num_images or
    with counts that do not add up to its images."""
    samples, _, _ = onevision_samples(files)
    (row,) = packed_microbatches(samples, 1, SEQ, 0, (3, TILE, TILE))
    assert row["batch_num_images"].tolist() == [3, 1] and row["images_per_sample"].tolist() == [4]
    model = LlavaModel(replace(anyres_model(files), anyres=ONEVISION), ParallelState.single())
    model.initialize(3)
    with torch.no_grad():
        assert torch.isfinite(model(**row)["loss"]).all()
        with pytest.raises(ValueError, match="need batch_num_images"):
            model(**{k: v for k, v in row.items() if k != "batch_num_images"})
        with pytest.raises(ValueError, match=r"batch_num_images adds up to 5 but the batch holds 4 image\(s\)"):
            model(**{**row, "batch_num_images": torch.tensor([3, 2])})


def test_a_cut_leaving_one_image_of_a_multi_image_record_is_too_long(files: DatasetFiles) -> None:
    """A three-image record of a question and answer per image (vicuna_v1 turns): a sequence length
    that keeps only its first, untiled, image is `too_long` (the model would tile a lone image), in
    the build and the probe alike."""
    write_multi_image_rows(files.images)
    turns = [{"from": "human", "value": "<image> Which color do you see?"}, {"from": "gpt", "value": "It is red."}]
    path = files.images / "turns.jsonl"
    names = [f"multi{number}.png" for number in range(len(MULTI_SIZES))]
    path.write_text(json.dumps({"id": "turns", "images": names, "conversations": turns * len(names)}) + "\n")
    record = LlavaJsonSource(path, files.images)[0]
    tokenizer, settings = load_tokenizer(files.tokenizer), ImageSettings(TILE, anyres=ONEVISION)
    whole = SampleBuilder(tokenizer, "vicuna_v1", settings, GRID * GRID, 4096).build(record)
    short = SampleBuilder(tokenizer, "vicuna_v1", settings, GRID * GRID, whole.image_spans[1][0] + 1)
    for read in (short.build, short.probe):
        with pytest.raises(BadSample, match="keeps 1 of its 3 images") as caught:
            read(record)
        assert caught.value.kind == "too_long"
