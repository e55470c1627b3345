"""LlavaModel and its parts on one process: shapes, errors, freezing, batches without images."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megamm.config import ConfigError, ProjectorConfig
from megamm.models.llava import LlavaModel, average_loss
from megamm.models.projectors.pixel_shuffle import pixel_shuffle
from megamm.parallel.state import ParallelState
from tests.tiny import (
    IMAGE_TOKEN_ID,
    NATIVE_IMAGE_TOKEN,
    NATIVE_VIDEO_TOKEN,
    llava_config,
    make_batch,
    native_microbatches,
    qwen2_vl_config,
    vision_config,
)


def _model(config=None, seed: int = 11) -> LlavaModel:
    model = LlavaModel(config or llava_config(), ParallelState.single())
    model.initialize(seed)
    return model


def test_forward_returns_per_token_loss_and_logits() -> None:
    model = _model()
    batch = make_batch(model.config, [1, 0])
    out = model(**batch, return_logits=True)
    assert out["loss"].shape == (2, 48) and out["loss"].dtype == torch.float32
    assert out["logits"].shape == (48, 2, model.language.padded_vocab_size)
    # The loss at position i is for predicting token i + 1; the last position predicts nothing.
    assert not out["loss_mask"][:, -1].any()
    expected_mask = torch.cat([batch["labels"][:, 1:] != -100, torch.zeros(2, 1, dtype=torch.bool)], dim=1)
    assert torch.equal(out["loss_mask"], expected_mask)
    assert torch.equal(out["loss"][~out["loss_mask"]], torch.zeros(int((~out["loss_mask"]).sum())))
    assert abs(average_loss(out).item() - torch.log(torch.tensor(100.0)).item()) < 0.5


def test_image_embeddings_land_on_image_positions() -> None:
    """Changing the image changes the hidden states at and after its positions, never before."""
    model = _model()
    batch = make_batch(model.config, [1, 0])
    first = model.embed(batch["input_ids"], batch["pixel_values"])
    second = model.embed(batch["input_ids"], batch["pixel_values"] + 1.0)
    image_positions = (batch["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().flatten()
    changed = (first[:, 0] - second[:, 0]).abs().sum(-1) > 0
    assert torch.equal(changed.nonzero().flatten(), image_positions)
    assert torch.equal(first[:, 1], second[:, 1])


def test_same_seed_same_model_other_seed_other_model() -> None:
    a, b, c = _model(seed=1), _model(seed=1), _model(seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.numel() > 1 and pa.std() > 0:
            assert not torch.equal(pa, pc), name


def test_image_token_count_mismatch_names_the_sample() -> None:
    model = _model()
    batch = make_batch(model.config, [1, 1])
    with pytest.raises(ValueError, match=r"sample 1: 16 image-token positions, but its 2 image\(s\) x 16"):
        model(batch["input_ids"], torch.cat([batch["pixel_values"]] * 2)[:3], batch["labels"], [1, 2])
    with pytest.raises(ValueError, match=r"32 image-token positions .* but 1 image\(s\) x 16 tokens"):
        model(batch["input_ids"], batch["pixel_values"][:1], batch["labels"])
    broken = batch["input_ids"].clone()
    broken[0, 2] = 5
    with pytest.raises(ValueError, match="sample 0: 15 image-token positions is not a multiple of the 16"):
        model(broken, batch["pixel_values"], batch["labels"])


def test_bad_image_shapes_are_reported() -> None:
    with pytest.raises(ConfigError, match="image_size 18 not divisible by patch_size 4"):
        LlavaModel(llava_config(vision=replace(vision_config(), image_size=18)), ParallelState.single())
    model = _model()
    with pytest.raises(ValueError, match=r"expects \[n, 3, 16, 16\]"):
        model.vision(torch.zeros(1, 3, 20, 20))


@pytest.mark.parametrize(
    ("freeze", "trained"),
    [
        ({"freeze_vision": True, "freeze_language": True}, {"projector"}),
        ({"freeze_vision": True}, {"projector", "language"}),
        ({}, {"vision", "projector", "language"}),
    ],
    ids=["stage1", "stage2", "all"],
)
def test_freeze_options(freeze: dict, trained: set[str]) -> None:
    model = _model(llava_config(**freeze))
    batch = make_batch(model.config, [1, 1])
    average_loss(model(**batch)).backward()
    with_grad = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trained
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name


def test_unused_vision_layers_are_frozen() -> None:
    """select_layer=-2 of 3 layers runs layers 0 and 1; layer 2 never runs and takes no grad."""
    model = _model()
    assert not any(p.requires_grad for p in model.vision.encoder.layers["2"].parameters())
    assert all(p.requires_grad for p in model.vision.encoder.layers["1"].parameters())


def test_batch_without_images_gives_zero_grads_to_image_path() -> None:
    model = _model()
    batch = make_batch(model.config, [0, 0])
    average_loss(model(**batch)).backward()
    for module in (model.vision, model.projector):
        for name, param in module.named_parameters():
            if param.requires_grad:
                assert param.grad is not None and torch.count_nonzero(param.grad) == 0, name
    assert any(torch.count_nonzero(p.grad) for p in model.language.parameters())


def test_pixel_shuffle_merges_2x2_blocks_row_major() -> None:
    grid, channels = 4, 3
    features = torch.arange(grid * grid * channels, dtype=torch.float32).view(grid * grid, 1, channels)
    merged = pixel_shuffle(features, grid)
    assert merged.shape == (4, 1, 4 * channels)
    patch = features[:, 0].view(grid, grid, channels)
    for i in range(2):
        for j in range(2):
            expected = torch.cat(
                [patch[2 * i, 2 * j], patch[2 * i, 2 * j + 1], patch[2 * i + 1, 2 * j], patch[2 * i + 1, 2 * j + 1]]
            )
            assert torch.equal(merged[i * 2 + j, 0], expected)


def test_pixel_shuffle_projector_gives_four_times_fewer_tokens() -> None:
    config = llava_config(projector=ProjectorConfig(type="linear", pixel_shuffle=True))
    model = _model(config)
    assert model.image_tokens_per_image == 4
    embeddings = model.encode_images(torch.randn(3, 3, 16, 16))
    assert embeddings.shape == (3, 4, config.language.transformer.hidden_size)


def test_native_tower_embeddings_land_on_image_and_video_positions() -> None:
    """Each image's and the video's merged embeddings, encoded on their own, fill their own tokens."""
    model = _model(qwen2_vl_config("qwen2_5_vl"))
    batch = native_microbatches(model.config)[0]
    hidden = model.embed(batch["input_ids"], batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                         pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"])
    image_rows = batch["image_grid_thw"].prod(dim=1).tolist()
    images = [model.vision(p, g[None]) for p, g in zip(batch["pixel_values"].split(image_rows),
                                                        batch["image_grid_thw"])]
    video = model.vision(batch["pixel_values_videos"], batch["video_grid_thw"])
    torch.testing.assert_close(hidden[:, 0][batch["input_ids"][0] == NATIVE_IMAGE_TOKEN], torch.cat(images))
    torch.testing.assert_close(hidden[:, 1][batch["input_ids"][1] == NATIVE_VIDEO_TOKEN], video)
    assert not hasattr(model, "projector")


def test_native_token_counts_are_checked_per_sample() -> None:
    model = _model(qwen2_vl_config())
    batch, packed = native_microbatches(model.config)
    assert model(**packed)["loss"].shape == (2, 40)  # images [2, 1]: the second sample's are counted from the third
    with pytest.raises(ValueError, match=r"sample 0: 12 image-token positions, but its 1 image\(s\) give "
                                         r"\(t \* h \* w / 4 tokens each, per image: \[6, 6\]\) = 6"):
        model(**{**batch, "images_per_sample": torch.tensor([1, 1])})
    with pytest.raises(ValueError, match=r"the batch has 12 image-token positions .* but 1 image\(s\) give"):
        model(**{**batch, "images_per_sample": None, "image_grid_thw": batch["image_grid_thw"][:1],
                 "pixel_values": batch["pixel_values"][:24]})
    with pytest.raises(ValueError, match=r"sample 0: 0 video-token positions, but its 1 video\(s\) give"):
        model(**{**batch, "videos_per_sample": torch.tensor([1, 0])})
    with pytest.raises(ValueError, match="the batch has 8 video-token positions .* but 0 video"):
        model(**{**batch, "pixel_values_videos": None, "video_grid_thw": None, "videos_per_sample": None})
    with pytest.raises(ValueError, match="pixel_values given without image_grid_thw"):
        model(**{**batch, "image_grid_thw": None})
    with pytest.raises(ValueError, match=r"position_ids has shape \(2, 40\)"):
        model(**{**batch, "position_ids": batch["position_ids"][0]})
    no_video = _model(replace(model.config, language=replace(model.config.language, video_token_id=None)))
    with pytest.raises(ValueError, match="the batch holds videos but language.video_token_id is not set"):
        no_video(**batch)
    fixed = _model()
    with pytest.raises(ValueError, match="the clip tower takes images"):
        fixed(**make_batch(fixed.config, [1, 0]), image_grid_thw=batch["image_grid_thw"])


@pytest.mark.parametrize(("freeze", "trained"), [
    ({"freeze_vision": True}, {"vision.merger", "language"}),
    ({"freeze_vision": True, "freeze_projector": True}, {"language"}),
    ({"freeze_projector": True, "freeze_language": True}, {"vision"}),
])
def test_native_freeze_flags_split_tower_and_merger(freeze: dict, trained: set[str]) -> None:
    """freeze_vision freezes the tower but not its merger (the projector), freeze_projector the merger."""
    model = _model(qwen2_vl_config(**freeze))
    average_loss(model(**native_microbatches(model.config)[0])).backward()
    got = set()
    for name, param in model.named_parameters():
        part = "vision.merger" if name.startswith("vision.merger.") else name.split(".")[0]
        assert (param.grad is not None) == param.requires_grad, name
        if param.requires_grad:
            got.add(part)
    assert got == trained
