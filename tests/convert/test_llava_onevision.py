"""LLaVA-OneVision conversion (images): a random tiny transformers
`LlavaOnevisionForConditionalGeneration` (SigLIP tower with the `full` feature strategy, tied Qwen2
text model, `anyres_max_2`) imported into megamm gives transformers' logits (fp32, 1e-4) on a batch
with a large square image (3 x 3 tiles, its features downsampled bilinearly) and a wide and a tall
one, and on a batch of an image and two videos (every frame pooled, one newline per video), at
tp=1 and (one spawned run for both batches) at tp=2 with SP and pp=2; import then export is
bit-exact and the export loads with `from_pretrained`; megamm's token count equals
LlavaOnevisionProcessor's rule on images of several sizes. The multi-image rule: a batch of a
three-image sample (one padded-square tile per image, its features and a newline) and a one-image
sample (tiled) gives transformers' logits with `batch_num_images`.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from megamm.config.anyres import image_tokens, video_tokens
from megamm.config.registry import HF_ARCHITECTURES
from megamm.convert.exporter import export_hf
from megamm.convert.importer import import_llava_hf
from megamm.data.anyres_images import preprocess_anyres
from megamm.data.images import preprocess
from megamm.parallel.state import ParallelState
from tests.convert.test_llava_next import check_layouts
from tests.convert.test_roundtrip import (
    IMAGE,
    IMAGE_TOKEN,
    PATCH,
    randomize_,
    save_hf,
    text_config,
    vision_kwargs,
)
from tests.convert.tiled import gathered_logits, load_imported, random_image

LOGIT_TOLERANCE = 1e-4
PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32], [16, 48], [48, 16], [48, 48]]
MAX_PATCHES = 2
VIDEO_TOKEN = 114
IMAGE_SIZES = [(60, 60), (20, 50), (50, 20)]  # one image per sample
SEQ = 96
VIDEO_FRAMES = 3
# The multi-image sample's images (wide, tall, square; one tile each) and the one-image sample's.
MULTI_SIZES = [(20, 50), (45, 13), (30, 30)]
LONE_SIZE = (50, 20)


def build_hf(seed: int = 2) -> LlavaOnevisionForConditionalGeneration:
    text = text_config("qwen2")
    text.max_position_embeddings = 256
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**{**vision_kwargs(), "hidden_act": "gelu_pytorch_tanh"}),
        text_config=text, image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio=f"anyres_max_{MAX_PATCHES}", tie_word_embeddings=True,
    )
    config._attn_implementation = "eager"
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    randomize_(model, seed)
    return model


def _tokens(size: tuple[int, int], tiled: bool = True) -> int:
    return image_tokens(size, [tuple(p) for p in PINPOINTS], IMAGE, IMAGE // PATCH, MAX_PATCHES, tiled)


def make_batch(seed: int = 8) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, IMAGE_TOKEN, (len(IMAGE_SIZES), SEQ), generator=generator)
    pixels, sizes = [], []
    for row, (height, width) in enumerate(IMAGE_SIZES):
        tiles, size = preprocess_anyres(random_image(height, width, seed + row), IMAGE, [tuple(p) for p in PINPOINTS],
                                        "siglip")
        ids[row, 2:2 + _tokens(size)] = IMAGE_TOKEN
        pixels.append(tiles)
        sizes.append(size)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.cat(pixels), "image_sizes": torch.tensor(sizes),
            "images_per_sample": torch.ones(len(IMAGE_SIZES), dtype=torch.long)}


def _hf_inputs(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"]),
            "pixel_values": batch["pixel_values"], "image_sizes": batch["image_sizes"],
            **({"pixel_values_videos": batch["pixel_values_videos"]} if "pixel_values_videos" in batch else {})}


def make_video_batch(seed: int = 9) -> dict:
    """Row 0: a wide image, then a video; row 1: a video only. Videos of VIDEO_FRAMES random frames
    (one tower input each), each run of video tokens `video_tokens(VIDEO_FRAMES, g)` long."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, IMAGE_TOKEN, (2, SEQ), generator=generator)
    tiles, size = preprocess_anyres(random_image(20, 50, seed), IMAGE, [tuple(p) for p in PINPOINTS], "siglip")
    ids[0, 2:2 + _tokens(size)] = IMAGE_TOKEN
    per_video = video_tokens(VIDEO_FRAMES, IMAGE // PATCH)
    for row, start in ((0, 4 + _tokens(size)), (1, 5)):
        ids[row, start:start + per_video] = VIDEO_TOKEN
    labels = ids.masked_fill((ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN), -100)
    return {"input_ids": ids, "labels": labels, "pixel_values": tiles, "image_sizes": torch.tensor([size]),
            "images_per_sample": torch.tensor([1, 0]), "videos_per_sample": torch.tensor([1, 1]),
            "pixel_values_videos": torch.randn(2, VIDEO_FRAMES, 3, IMAGE, IMAGE, generator=generator)}


def make_multi_image_batch(seed: int = 10) -> dict:
    """Row 0: the MULTI_SIZES images, each padded to a square and resized to one tile (as
    LlavaOnevisionImageProcessor treats a multi-image sample's), `g^2 + 1` tokens each with text
    between; row 1: one LONE_SIZE image with its base image and tiles."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, IMAGE_TOKEN, (2, SEQ), generator=generator)
    pixels, start = [], 2
    for number, (height, width) in enumerate(MULTI_SIZES):
        pixels.append(preprocess(random_image(height, width, seed + number), IMAGE, "pad", "siglip")[None])
        ids[0, start:start + _tokens((height, width), tiled=False)] = IMAGE_TOKEN
        start += _tokens((height, width), tiled=False) + 3
    tiles, size = preprocess_anyres(random_image(*LONE_SIZE, seed + 5), IMAGE, [tuple(p) for p in PINPOINTS], "siglip")
    ids[1, 2:2 + _tokens(size)] = IMAGE_TOKEN
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.cat([*pixels, tiles]),
            "image_sizes": torch.tensor([*MULTI_SIZES, size]), "images_per_sample": torch.tensor([3, 1])}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("onevision")
    hf = build_hf()
    directory = save_hf(hf, root / "hf", shard_size="200KB")
    import_llava_hf(directory, root / "imported", tp=2, pp=2)
    batch, videos = make_batch(), make_video_batch()
    with torch.no_grad():
        expected, expected_videos = hf(**_hf_inputs(batch)).logits, hf(**_hf_inputs(videos)).logits
    return {"root": root, "hf_dir": directory, "batch": batch, "hf_logits": expected, "video_batch": videos,
            "hf_video_logits": expected_videos}


def test_onevision_import_logits_round_trip(converted: dict) -> None:
    tmp_path, directory, batch, expected = (converted[k] for k in ("root", "hf_dir", "batch", "hf_logits"))
    model = load_imported(tmp_path / "imported", ParallelState.single())
    assert model.config.anyres.max_num_patches == MAX_PATCHES and model.config.vision.family == "siglip"
    error = (gathered_logits(model, batch) - expected).abs().max().item()
    assert error < LOGIT_TOLERANCE, f"max |megamm - transformers| logit difference {error:.2e}"

    out = tmp_path / "exported"
    export_hf(tmp_path / "imported", out, architecture="llava-onevision-hf")
    original, exported = {}, {}
    for shard in sorted(directory.glob("*.safetensors")):
        original.update(load_file(shard))
    for shard in sorted(out.glob("*.safetensors")):
        exported.update(load_file(shard))
    # Both spellings (transformers 5 saves vision_tower.* without vision_model.) by canonical name.
    adapter = HF_ARCHITECTURES.get("llava-onevision-hf")
    original = {adapter.canonical_name(k): v for k, v in original.items()}
    exported = {adapter.canonical_name(k): v for k, v in exported.items()}
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    reloaded = LlavaOnevisionForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    assert reloaded.config.video_token_index == VIDEO_TOKEN
    with torch.no_grad():
        assert torch.equal(reloaded(**_hf_inputs(batch)).logits, expected)


def test_onevision_video_logits_match_transformers(converted: dict) -> None:
    """Videos (every frame's features pooled 2x bilinearly, one newline per video) beside an image:
    megamm's logits equal transformers' `get_video_features` path; a wrong token count names the sample."""
    model = load_imported(converted["root"] / "imported", ParallelState.single())
    assert model.config.language.video_token_id == VIDEO_TOKEN
    batch = converted["video_batch"]
    error = (gathered_logits(model, batch) - converted["hf_video_logits"]).abs().max().item()
    print(f"OneVision video logits: max |megamm - transformers| {error:.2e}")
    assert error < LOGIT_TOLERANCE, f"max |megamm - transformers| logit difference {error:.2e}"
    short = {**batch, "input_ids": batch["input_ids"].clone()}
    short["input_ids"][1, 5] = 0
    with pytest.raises(ValueError, match=r"sample 1: 12 video-token positions, but its 1 video\(s\)"):
        model(**{k: v for k, v in short.items() if k != "labels"})
    with pytest.raises(ValueError, match=r"\[videos, frames, C, H, W\]"):
        model(**{**batch, "pixel_values_videos": batch["pixel_values_videos"].flatten(0, 1)})


def test_onevision_multi_image_logits_match_transformers(converted: dict) -> None:
    """A three-image sample (each image one tile: its features and one newline) beside a one-image
    sample (tiled): megamm's logits, its images decided by images_per_sample, equal transformers'
    given the same pixels and `batch_num_images`; the import sets the rule, which LLaVA-NeXT's export
    refuses (and OneVision's export requires)."""
    model = load_imported(converted["root"] / "imported", ParallelState.single())
    assert model.config.anyres.single_tile_multi_image
    assert HF_ARCHITECTURES.get("llava-next-hf").layout_problems(model.config) != []
    tiles_all = replace(model.config, anyres=replace(model.config.anyres, single_tile_multi_image=False))
    assert HF_ARCHITECTURES.get("llava-onevision-hf").layout_problems(tiles_all) != []
    batch = make_multi_image_batch()
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(converted["hf_dir"], attn_implementation="eager")
    with torch.no_grad():
        expected = hf.eval()(**_hf_inputs(batch), batch_num_images=batch["images_per_sample"]).logits
    error = (gathered_logits(model, batch) - expected).abs().max().item()
    print(f"OneVision multi-image logits: max |megamm - transformers| {error:.2e}")
    assert error < LOGIT_TOLERANCE, f"max |megamm - transformers| logit difference {error:.2e}"


def test_video_token_counts_match_the_processor_rule() -> None:
    """LlavaOnevisionProcessor's video count (run on a stand-in holding the field it reads): frames x
    ceil(g / 2)^2 + 1, for even and odd patch grids (27: SigLIP-384 with 14-pixel patches)."""
    for grid in (3, 4, 5, 27):
        processor = SimpleNamespace(num_image_tokens=grid * grid)
        sizes = [(frames, 384, 384) for frames in (1, 2, 8, 32)]
        expected = LlavaOnevisionProcessor._get_num_multimodal_tokens(processor, video_sizes=sizes)
        assert [video_tokens(frames, grid) for frames, _, _ in sizes] == expected["num_video_tokens"], grid


def test_token_counts_match_the_processor_rule() -> None:
    """LlavaOnevisionProcessor's own arithmetic (run on a stand-in holding the fields it reads) on a
    grid of image sizes, with OneVision's 6 x 6 pinpoints scaled to 16-pixel tiles and anyres_max_9;
    some sizes fall where the unpadded grid is between 1 and 1.1 times the limit (kept, not shrunk)."""
    grid, limit = IMAGE // PATCH, 9
    pinpoints = [[i * IMAGE, j * IMAGE] for i in range(1, 7) for j in range(1, 7)]
    processor = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=pinpoints),
                                num_image_tokens=grid * grid, vision_aspect_ratio=f"anyres_max_{limit}")
    processor._get_unpadded_features = LlavaOnevisionProcessor._get_unpadded_features.__get__(processor)
    for height in range(5, 200, 7):
        for width in range(5, 200, 9):
            expected = LlavaOnevisionProcessor._get_number_of_features(processor, height, width, IMAGE, IMAGE)
            ours = image_tokens((height, width), [tuple(p) for p in pinpoints], IMAGE, grid, limit)
            assert ours == expected, (height, width)


@pytest.mark.slow
def test_onevision_matches_transformers_at_tp2_and_pp2(converted: dict) -> None:
    """The image batch and the video batch (an image and two videos) in one spawned run: tp=2 with SP
    logits and the pp=2 loss equal transformers'."""
    check_layouts(converted["root"] / "imported", (converted["batch"], converted["hf_logits"]),
                  (converted["video_batch"], converted["hf_video_logits"]))
