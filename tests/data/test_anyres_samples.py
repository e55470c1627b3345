"""Any-resolution (LLaVA-NeXT) samples through the data pipeline: each image is tiled at the model's
pinpoints (base image + tiles), its placeholder expands to the token count of its own size, labels
are built span by span (image positions never trained), the header-only probe gives the build's
counts, and padded and packed microbatches carry every image's size, counting images (not tiles) per
row; the model accepts those microbatches (its per-sample token check is strict).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from megamm.config import LlavaConfig
from megamm.config.anyres import AnyResConfig, image_tokens, tiles_per_image
from megamm.config.constants import IGNORE_INDEX
from megamm.data.batching import packed_microbatches, padded_microbatches
from megamm.data.samples import ImageSettings, Sample, SampleBuilder
from megamm.data.sources import LlavaJsonSource
from megamm.data.tokenizer import load_tokenizer
from megamm.models.llava import LlavaModel
from megamm.parallel.state import ParallelState
from tests.data_fixtures import DatasetFiles, model_for, write_dataset

PINPOINTS = ((16, 32), (32, 16), (32, 32), (48, 16), (16, 48))
TILE, GRID = 16, 4
SEQ = 256


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
