"""Tiny model configurations and deterministic batches shared by the tests."""

from __future__ import annotations

from dataclasses import replace

import torch

from megamm.config import LanguageConfig, LlavaConfig, ProjectorConfig, TransformerConfig, VisionConfig

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
