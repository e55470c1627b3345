"""Configuration validation lists every violation at once."""

from __future__ import annotations

from dataclasses import replace

import pytest

from megamm.config import ConfigError, ParallelConfig
from tests.tiny import language_config, llava_config, vision_config


def test_valid_config_has_no_problems() -> None:
    assert llava_config().problems(ParallelConfig(tensor_model_parallel_size=4), seq_length=48) == []


def test_every_violation_is_listed() -> None:
    config = llava_config(
        vision=replace(vision_config(num_attention_heads=3), image_size=15),
        language=language_config(num_query_groups=2, ffn_hidden_size=90),
    )
    parallel = ParallelConfig(tensor_model_parallel_size=4, sequence_parallel=True)
    with pytest.raises(ConfigError) as raised:
        config.validate(parallel, seq_length=50)
    text = str(raised.value)
    for expected in (
        "vision.hidden_size 32 not divisible by num_attention_heads 3",
        "vision.num_attention_heads 3 not divisible by tensor-model-parallel size 4",
        "vision.image_size 15 not divisible by patch_size 4",
        "language.num_query_groups 2 not divisible by tensor-model-parallel size 4",
        "language.ffn_hidden_size 90 not divisible by tensor-model-parallel size 4",
        "sequence length 50 not divisible by tensor-model-parallel size 4",
    ):
        assert expected in text
    assert len(raised.value.problems) >= 6


def test_pixel_shuffle_needs_even_grid() -> None:
    from megamm.config import ProjectorConfig

    config = llava_config(
        vision=replace(vision_config(), image_size=12), projector=ProjectorConfig(pixel_shuffle=True)
    )
    assert any("patch grid divisible by 2" in p for p in config.problems(ParallelConfig()))


def test_image_token_must_be_in_vocabulary() -> None:
    config = llava_config(language=replace(language_config(), image_token_id=100))
    assert any("image_token_id 100" in p for p in config.problems(ParallelConfig()))


def test_position_embedding_must_be_what_each_tower_builds() -> None:
    config = llava_config(
        vision=replace(vision_config(), transformer=replace(vision_config().transformer, position_embedding="rope")),
        language=replace(language_config(), transformer=replace(language_config().transformer,
                                                                 position_embedding="learned")),
    )
    problems = config.problems(ParallelConfig())
    assert "vision.transformer.position_embedding must be 'learned' (the ViT learns a position table), got 'rope'" \
        in problems
    assert ("language.transformer.position_embedding must be 'rope' (the decoder rotates queries and keys), "
            "got 'learned'") in problems


def test_max_position_embeddings_bounds_both_towers() -> None:
    # The tiny ViT has 16 patches + a class token = 17 positions; the decoder is asked for 48.
    vision = vision_config(max_position_embeddings=16)
    language = language_config(max_position_embeddings=47)
    problems = llava_config(vision=vision, language=language).problems(ParallelConfig(), seq_length=48)
    assert "vision: 17 positions (patches + class token) exceed vision.transformer.max_position_embeddings 16" \
        in problems
    assert "sequence length 48 exceeds language.transformer.max_position_embeddings 47" in problems
    fits = llava_config(vision=vision_config(max_position_embeddings=17), language=language_config(
        max_position_embeddings=48))
    assert fits.problems(ParallelConfig(), seq_length=48) == []
