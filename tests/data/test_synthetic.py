"""The synthetic data of a native-resolution model: images of random sizes within the pixel range,
their token runs, patches, grids and M-RoPE positions consistent with each other."""

from __future__ import annotations

import pytest
import torch

from megamm.data.mrope import mrope_position_ids
from megamm.data.synthetic import PALETTE, SyntheticNativeDataset, collate
from tests.tiny import IMAGE_TOKEN_ID, llava_config, native_vision_config

# One merge window is (4 * 2)^2 = 64 pixels: 2 to 12 windows (tokens) per image.
PIXELS = (128, 768)


def test_images_of_random_sizes() -> None:
    config = llava_config(vision=native_vision_config())
    dataset = SyntheticNativeDataset(config, 96, seed=3, max_images=2, pixel_range=PIXELS)
    grids, seen_images = set(), 0
    for index in range(24):
        sample = dataset[index]
        ids, grid_thw = sample["input_ids"], sample["image_grid_thw"]
        assert ids.shape == (96,) and sample["labels"][ids == IMAGE_TOKEN_ID].eq(-100).all()
        tokens = [int(t * h * w) // 4 for t, h, w in grid_thw.tolist()]
        assert all(2 <= n <= 12 for n in tokens) and (grid_thw[:, 0] == 1).all()
        assert int((ids == IMAGE_TOKEN_ID).sum()) == sum(tokens)
        assert sample["pixel_values"].shape == (int(grid_thw.prod(dim=1).sum()), 3 * 2 * 4 * 4)
        # Each image's patches are its color (the token after it names it) plus noise.
        runs = torch.nonzero(ids == IMAGE_TOKEN_ID).flatten().tolist()
        ends = [p for p in runs if p + 1 not in runs]
        start = 0
        for (t, h, w), end in zip(grid_thw.tolist(), ends, strict=True):
            color = int(ids[end + 1]) - 2
            patches = sample["pixel_values"][start : start + t * h * w].reshape(-1, 3, 32)
            assert (patches.mean(dim=(0, 2)) - PALETTE[color]).abs().max() < 0.1
            start += t * h * w
        expected = mrope_position_ids(ids, image_token_id=IMAGE_TOKEN_ID, video_token_id=-1,
                                      spatial_merge_size=2, image_grid_thw=grid_thw)
        assert torch.equal(sample["position_ids"], expected)
        grids |= {tuple(g) for g in grid_thw.tolist()}
        seen_images += len(grid_thw)
    assert len(grids) >= 5 and seen_images >= 12  # sizes, so token counts, vary
    assert torch.equal(dataset[5]["pixel_values"], dataset[5]["pixel_values"])  # deterministic
    batch = collate([dataset[i] for i in range(4)])
    assert batch["position_ids"].shape == (3, 4, 96)
    assert batch["images_per_sample"].tolist() == [len(dataset[i]["image_grid_thw"]) for i in range(4)]
    assert torch.equal(batch["image_grid_thw"], torch.cat([dataset[i]["image_grid_thw"] for i in range(4)]))
    assert batch["pixel_values_videos"] is None and batch["videos_per_sample"].tolist() == [0, 0, 0, 0]


def test_sequence_too_short_for_the_fewest_tokens() -> None:
    config = llava_config(vision=native_vision_config())
    with pytest.raises(ValueError, match="--seq-length 8 cannot hold 2 image"):
        SyntheticNativeDataset(config, 8, seed=0, max_images=2, pixel_range=PIXELS)


def test_text_never_holds_the_video_token() -> None:
    from tests.tiny import qwen2_vl_config

    config = qwen2_vl_config()
    video_token = config.language.video_token_id
    dataset = SyntheticNativeDataset(config, 96, seed=3, max_images=1, pixel_range=PIXELS)
    assert not any((dataset[index]["input_ids"] == video_token).any() for index in range(64))


@pytest.mark.parametrize("single_tile_multi_image", [False, True], ids=["tile_all", "multi_image_rule"])
def test_any_resolution_images_of_random_sizes_fit_the_model(single_tile_multi_image: bool) -> None:
    """Each synthetic image's token run and tiles are what the any-resolution model takes for its
    size (the model's strict per-sample check runs on the collated batch), and sizes vary; under
    LLaVA-OneVision's multi-image rule the images of a two-image sample are one tile each."""
    from megamm.config.anyres import AnyResConfig
    from megamm.data.synthetic import SyntheticAnyResDataset
    from megamm.models.llava import LlavaModel
    from megamm.parallel.state import ParallelState

    config = llava_config(anyres=AnyResConfig(((16, 32), (32, 16), (32, 32)),
                                              single_tile_multi_image=single_tile_multi_image))
    dataset = SyntheticAnyResDataset(config, 160, seed=3, max_images=2)
    model = LlavaModel(config, ParallelState.single())
    model.initialize(0)
    sizes, counts = set(), set()
    for index in range(12):
        sample = dataset[index]
        ids, image_sizes = sample["input_ids"], [tuple(s) for s in sample["image_sizes"].tolist()]
        tiled = model.anyres.tiled_images(len(image_sizes), [len(image_sizes)])
        assert ids.shape == (160,) and sample["labels"][ids == IMAGE_TOKEN_ID].eq(-100).all()
        assert int((ids == IMAGE_TOKEN_ID).sum()) == sum(model.anyres.token_counts(image_sizes, tiled))
        assert sample["pixel_values"].shape == (sum(model.anyres.tile_counts(image_sizes, tiled)), 3, 16, 16)
        sizes |= set(image_sizes)
        counts.add(len(image_sizes))
    assert len(sizes) >= 4 and {1, 2} <= counts
    batch = collate([dataset[i] for i in range(4)])
    assert batch["images_per_sample"].tolist() == [len(dataset[i]["image_sizes"]) for i in range(4)]
    assert batch["image_sizes"].shape == (int(batch["images_per_sample"].sum()), 2)
    loss = model(**batch)["loss"]
    assert torch.isfinite(loss).all()


def test_any_resolution_sequence_too_short_is_refused() -> None:
    from megamm.config.anyres import AnyResConfig
    from megamm.data.synthetic import SyntheticAnyResDataset

    config = llava_config(anyres=AnyResConfig(((16, 32), (32, 16), (32, 32))))
    with pytest.raises(ValueError, match="--seq-length 12 cannot hold 1 any-resolution image"):
        SyntheticAnyResDataset(config, 12, seed=0, max_images=1)
