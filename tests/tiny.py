"""Tiny model configurations and deterministic batches shared by the tests."""

from __future__ import annotations

from dataclasses import replace

import torch

from megamm.config import LanguageConfig, LlavaConfig, ProjectorConfig, TransformerConfig, VisionConfig
from megamm.config.model import NativeResolutionConfig

IMAGE_TOKEN_ID = 99


def vision_config(**transformer_overrides) -> VisionConfig:
    """CLIP-like: 16x16 images, 4x4 patches -> 16 patches + class token = 17 tokens (odd, so
    sequence parallelism has to pad)."""
    transformer = TransformerConfig(
        hidden_size=32,
        num_layers=3,
        num_attention_heads=4,
        ffn_hidden_size=64,
        normalization="layernorm",
        activation="quick_gelu",
        add_bias_linear=True,
        position_embedding="learned",
        causal=False,
    )
    return VisionConfig(replace(transformer, **transformer_overrides), image_size=16, patch_size=4)


def native_vision_config(windows: bool = False) -> VisionConfig:
    """Qwen2-VL-like (qwen2_vl): 4-pixel patches of 2 frames, 2x2 merge, 2 layers of 4 heads of 8
    channels, merged to 64 wide. `windows`: Qwen2.5-VL-like (qwen2_5_vl), windows of 16 pixels (2x2
    merged tokens) in layer 0, layer 1 full, video positions at 2 tokens per second."""
    transformer = TransformerConfig(
        hidden_size=32,
        num_layers=2,
        num_attention_heads=4,
        ffn_hidden_size=64,
        normalization="layernorm",
        activation="quick_gelu",
        add_bias_linear=True,
        position_embedding="rope",
        causal=False,
    )
    native = NativeResolutionConfig(
        out_hidden_size=64,
        window_size=16 if windows else None,
        fullatt_block_indexes=(1,) if windows else (),
        tokens_per_second=2.0 if windows else None,
    )
    family = "qwen2_5_vl" if windows else "qwen2_vl"
    return VisionConfig(transformer, family=family, patch_size=4, native_resolution=native)


def language_config(**transformer_overrides) -> LanguageConfig:
    """LLaMA-like with GQA (8 heads, 4 groups) and a vocabulary of 100 (not a multiple of tp)."""
    transformer = TransformerConfig(
        hidden_size=64,
        num_layers=2,
        num_attention_heads=8,
        num_query_groups=4,
        ffn_hidden_size=96,
        rotary_base=500.0,
    )
    return LanguageConfig(
        replace(transformer, **transformer_overrides),
        vocab_size=100,
        make_vocab_size_divisible_by=8,
        image_token_id=IMAGE_TOKEN_ID,
    )


def qwen2_language_config() -> LanguageConfig:
    """Qwen2-like: biases on q, k and v only, GQA, rope base 1e6, tied embeddings."""
    language = language_config(add_qkv_bias=True, rotary_base=1e6)
    return replace(language, family="qwen2", tie_word_embeddings=True)


def llava_config(**overrides) -> LlavaConfig:
    config = LlavaConfig(vision=vision_config(), language=language_config(), projector=ProjectorConfig())
    return replace(config, **overrides)


def make_batch(
    config: LlavaConfig, images_per_sample: list[int], seq_length: int = 48, seed: int = 7
) -> dict[str, torch.Tensor]:
    """A batch whose image-token positions match `images_per_sample` (one block per image).

    Every rank building it with the same arguments gets the same tensors. Labels ignore the image
    positions and the first two tokens of each sample (a stand-in for a prompt).
    """
    generator = torch.Generator().manual_seed(seed)
    per_image = config.image_tokens_per_image
    vocab = config.language.vocab_size
    input_ids = torch.randint(0, IMAGE_TOKEN_ID, (len(images_per_sample), seq_length), generator=generator)
    for sample, count in enumerate(images_per_sample):
        start = 2
        for _ in range(count):
            input_ids[sample, start : start + per_image] = IMAGE_TOKEN_ID
            start += per_image + 1
    assert vocab > IMAGE_TOKEN_ID
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN_ID, -100)
    labels[:, :2] = -100
    vision = config.vision
    pixel_values = torch.randn(
        sum(images_per_sample), vision.num_channels, vision.image_size, vision.image_size, generator=generator
    )
    return {
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": pixel_values if sum(images_per_sample) else None,
        "images_per_sample": torch.tensor(images_per_sample),
    }


def anyres_batch(config: LlavaConfig, sizes: list[list[tuple[int, int]]], seq_length: int = 160,
                 seed: int = 7) -> dict[str, torch.Tensor]:
    """A batch for an any-resolution `config` (LLaVA-NeXT / OneVision): row i holds random text and
    one run of image tokens per image of `sizes[i]` ((height, width) in pixels, random pixels) with
    the count `config.anyres` gives it; labels ignore the image positions and the first two tokens."""
    import numpy as np
    from PIL import Image

    from megamm.config.anyres import image_tokens
    from megamm.data.anyres_images import preprocess_anyres

    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    tile, pinpoints = config.vision.image_size, config.anyres.pinpoints
    input_ids = torch.randint(0, IMAGE_TOKEN_ID, (len(sizes), seq_length), generator=generator)
    pixels, image_sizes = [], []
    for row, row_sizes in enumerate(sizes):
        start = 2
        for height, width in row_sizes:
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            tiles, size = preprocess_anyres(image, tile, pinpoints, "clip")
            count = image_tokens(size, pinpoints, tile, config.vision.grid_size, config.anyres.max_num_patches)
            input_ids[row, start:start + count] = IMAGE_TOKEN_ID
            start += count + 1
            pixels.append(tiles)
            image_sizes.append(size)
        assert start <= seq_length, f"row {row}: {start} tokens do not fit in {seq_length}"
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN_ID, -100)
    labels[:, :2] = -100
    return {"input_ids": input_ids, "labels": labels, "pixel_values": torch.cat(pixels),
            "image_sizes": torch.tensor(image_sizes), "images_per_sample": torch.tensor([len(r) for r in sizes])}


# The Qwen2-VL family: special ids at the top of the 100-token vocabulary.
VISION_START, VISION_END, NATIVE_IMAGE_TOKEN, NATIVE_VIDEO_TOKEN = 95, 96, 97, 98
TEXT_TOKENS = 95  # ids below the special ones
NATIVE_SEQ = 40


def qwen2_vl_config(family: str = "qwen2_vl", **overrides) -> LlavaConfig:
    """A tiny Qwen2-VL (or, with family "qwen2_5_vl", Qwen2.5-VL: RMSNorm, SwiGLU, windows of 2x2
    merged tokens, layer 1 full) tower of 4x4 patches and a Qwen2 language model with M-RoPE (4
    heads of 16: 8 rotary pairs split 2 / 3 / 3, a rope base of 50 so that every pair turns over 40
    positions; GQA with 2 groups, so tp=2 splits both)."""
    windowed = family == "qwen2_5_vl"
    tower = TransformerConfig(
        hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
        normalization="rmsnorm" if windowed else "layernorm", norm_epsilon=1e-6,
        activation="swiglu" if windowed else "quick_gelu", add_bias_linear=True, position_embedding="rope",
        causal=False,
    )
    native = NativeResolutionConfig(out_hidden_size=64, window_size=16 if windowed else None,
                                    fullatt_block_indexes=(1,) if windowed else (),
                                    tokens_per_second=2 if windowed else None)
    vision = VisionConfig(tower, family=family, patch_size=4, native_resolution=native)
    language = replace(
        qwen2_language_config(), image_token_id=NATIVE_IMAGE_TOKEN, video_token_id=NATIVE_VIDEO_TOKEN,
        mrope_section=(2, 3, 3),
        transformer=replace(qwen2_language_config().transformer, num_attention_heads=4, num_query_groups=2,
                            rotary_base=50.0),
    )
    config = LlavaConfig(vision=vision, language=language, projector=None)
    return replace(config, **overrides)


def native_vision_inputs(config: LlavaConfig, seed: int = 5) -> dict:
    """Images of 16x24, 24x16 and 16x16 pixels and a 4-frame 16x16 video (fps 2), random pixels,
    preprocessed by megamm.data.native_resolution / megamm.data.video for `config`'s tower:
    grids (1, 4, 6), (1, 6, 4), (1, 4, 4) and (2, 4, 4), so 6, 6, 4 and 8 tokens."""
    import numpy as np
    from PIL import Image

    from megamm.data.native_resolution import NativeResolution, preprocess_image
    from megamm.data.video import preprocess_video

    native = config.vision.native_resolution
    resolution = NativeResolution(patch_size=config.vision.patch_size, merge_size=native.spatial_merge_size,
                                  temporal_patch_size=native.temporal_patch_size, min_pixels=64, max_pixels=4096)
    rng = np.random.default_rng(seed)

    def picture(height: int, width: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

    images = [preprocess_image(picture(h, w), resolution) for h, w in ((16, 24), (24, 16), (16, 16))]
    video = preprocess_video([picture(16, 16) for _ in range(4)], fps=2.0, resolution=resolution)
    return {"images": images, "video": video}


def _text(generator: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, TEXT_TOKENS, (n,), generator=generator).tolist()


def _vision_run(token: int, n: int) -> list[int]:
    return [VISION_START, *[token] * n, VISION_END]


def native_microbatches(config: LlavaConfig, seed: int = 11) -> list[dict[str, torch.Tensor]]:
    """Two microbatches of 2 rows x NATIVE_SEQ tokens for a Qwen2-VL-family `config`, built with
    megamm.data (patches, mrope positions, packing):

    - padded: row 0 is text, image A, text, image B, text; row 1 text, the video, text;
    - packed: row 0 holds the samples of the padded rows back to back (positions restarting at the
      second sample, block-causal mask), row 1 a sample with image C and then padding.
    Labels ignore vision tokens and each sample's first two tokens. Every call gives the same tensors.
    """
    from megamm.data.mrope import mrope_position_ids, packed_mrope_position_ids
    from megamm.data.packing import block_causal_mask, packed_sequence

    inputs = native_vision_inputs(config)
    a, b, c = inputs["images"]
    video = inputs["video"]
    generator = torch.Generator().manual_seed(seed)
    first = (_text(generator, 3) + _vision_run(NATIVE_IMAGE_TOKEN, a.num_tokens) + _text(generator, 2)
             + _vision_run(NATIVE_IMAGE_TOKEN, b.num_tokens) + _text(generator, 3))
    second = _text(generator, 2) + _vision_run(NATIVE_VIDEO_TOKEN, video.num_tokens) + _text(generator, 4)
    third = _text(generator, 4) + _vision_run(NATIVE_IMAGE_TOKEN, c.num_tokens) + _text(generator, 3)
    first += _text(generator, NATIVE_SEQ - len(first) - len(second))  # rows 0 of both batches are full
    merge = config.vision.native_resolution.spatial_merge_size
    tokens_per_second = config.vision.native_resolution.tokens_per_second
    ids = {"image_token_id": NATIVE_IMAGE_TOKEN, "video_token_id": NATIVE_VIDEO_TOKEN, "spatial_merge_size": merge,
           "tokens_per_second": tokens_per_second}
    seconds = [video.second_per_grid] if tokens_per_second is not None else None
    no_seconds = [] if tokens_per_second is not None else None  # rows without videos

    def labels_of(sample: list[int]) -> list[int]:
        out = [-100 if t in (NATIVE_IMAGE_TOKEN, NATIVE_VIDEO_TOKEN) else t for t in sample]
        return [-100, -100, *out[2:]]

    def patches(items: list) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not items:
            return None, None
        return torch.cat([i.pixel_values for i in items]), torch.tensor([i.grid_thw for i in items])

    padded_rows = [first + _text(generator, NATIVE_SEQ - len(first)), second + _text(generator, NATIVE_SEQ - len(second))]
    padded_positions = [
        mrope_position_ids(padded_rows[0], image_grid_thw=[a.grid_thw, b.grid_thw], second_per_grid_ts=no_seconds,
                           **ids),
        mrope_position_ids(padded_rows[1], video_grid_thw=[video.grid_thw], second_per_grid_ts=seconds, **ids),
    ]
    image_values, image_grids = patches([a, b])
    video_values, video_grids = patches([video])
    padded = {
        "input_ids": torch.tensor(padded_rows), "labels": torch.tensor([labels_of(r) for r in padded_rows]),
        "position_ids": torch.stack(padded_positions, dim=1),
        "pixel_values": image_values, "image_grid_thw": image_grids, "images_per_sample": torch.tensor([2, 0]),
        "pixel_values_videos": video_values, "video_grid_thw": video_grids, "videos_per_sample": torch.tensor([0, 1]),
    }
    rows = [packed_sequence([{"input_ids": s, "labels": labels_of(s)} for s in samples], NATIVE_SEQ, pad_id=0)
            for samples in ([first, second], [third])]
    packed_positions = [
        packed_mrope_position_ids(rows[0]["input_ids"], rows[0]["cu_seqlens"], image_grid_thw=[a.grid_thw, b.grid_thw],
                                  video_grid_thw=[video.grid_thw], second_per_grid_ts=seconds, **ids),
        packed_mrope_position_ids(rows[1]["input_ids"], rows[1]["cu_seqlens"], image_grid_thw=[c.grid_thw],
                                  second_per_grid_ts=no_seconds, **ids),
    ]
    image_values, image_grids = patches([a, b, c])
    packed = {
        "input_ids": torch.stack([r["input_ids"] for r in rows]), "labels": torch.stack([r["labels"] for r in rows]),
        "position_ids": torch.stack(packed_positions, dim=1),
        "attention_mask": torch.stack([block_causal_mask(r["cu_seqlens"], NATIVE_SEQ) for r in rows])[:, None],
        "pixel_values": image_values, "image_grid_thw": image_grids, "images_per_sample": torch.tensor([2, 1]),
        "pixel_values_videos": video_values, "video_grid_thw": video_grids, "videos_per_sample": torch.tensor([1, 0]),
    }
    return [padded, packed]
def without_key_bias(name: str, tensor: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """A language QKV bias without its key rows, other tensors unchanged.

    The key bias has no gradient but rounding noise: it adds one vector to every key of a head, which
    shifts each query's scores by a constant that softmax ignores. Adam turns that noise into +-lr
    steps, so those rows differ between layouts by construction and prove nothing.
    """
    if not (name.startswith("language.") and name.endswith("self_attention.qkv.bias")):
        return tensor
    q, kv = config.num_attention_heads * config.head_dim, config.query_groups * config.head_dim
    return torch.cat([tensor[:q], tensor[q + kv:]])


def internvl_config(qk_norm: bool = True, vocab_size: int = 512, image_token_id: int = IMAGE_TOKEN_ID,
                    **overrides) -> LlavaConfig:
    """A tiny InternVL: an InternViT tower (16x16 tiles, 4x4 patches + class token = 17 positions,
    odd for sequence parallelism), with QK norm and RMSNorm (`qk_norm`) or neither, LayerNorm and
    q/k/v biases; pixel shuffle into 4 tokens per tile and InternVL's projector."""
    from megamm.config import InternViTConfig

    transformer = TransformerConfig(
        hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
        normalization="rmsnorm" if qk_norm else "layernorm", norm_epsilon=1e-6, activation="gelu",
        add_bias_linear=True, position_embedding="learned", max_position_embeddings=17, causal=False,
    )
    vision = VisionConfig(transformer, family="internvit", image_size=16, patch_size=4, class_token=True,
                          pre_norm=False, patch_bias=True, select_layer=-1,
                          intern_vit=InternViTConfig(qk_norm=qk_norm, qkv_bias=not qk_norm))
    language = replace(language_config(), vocab_size=vocab_size, image_token_id=image_token_id)
    projector = ProjectorConfig(type="internvl_mlp", pixel_shuffle=True)
    return replace(LlavaConfig(vision=vision, language=language, projector=projector), **overrides)
