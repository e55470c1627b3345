"""M-RoPE equals transformers' Qwen2-VL rotary (its table and its rotate-half application) on random
queries and random 3-axis positions, and a language model with M-RoPE refuses 1-D position ids."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

from megamm.config import ParallelConfig
from megamm.models.language import LanguageModel
from megamm.parallel.state import ParallelState
from megamm.transformer.rope import MultimodalRotaryEmbedding, RotaryEmbedding, apply_rotary
from tests.tiny import language_config

HEAD_DIM, BASE = 32, 1e4


@pytest.mark.parametrize("section", [(4, 6, 6), (8, 4, 4), (0, 8, 8)])
def test_mrope_matches_transformers(section: tuple[int, int, int]) -> None:
    generator = torch.Generator().manual_seed(0)
    batch, seq, heads = 2, 11, 3
    # Axes differ from each other (as for image tokens), so a run taking the wrong axis shows.
    positions = torch.randint(0, 300, (3, batch, seq), generator=generator)
    q = torch.randn(batch, heads, seq, HEAD_DIM, generator=generator)
    hf_config = Qwen2VLTextConfig(hidden_size=HEAD_DIM * heads, num_attention_heads=heads,
                                  rope_parameters={"rope_type": "default", "rope_theta": BASE,
                                                   "mrope_section": list(section)})
    cos, sin = Qwen2VLRotaryEmbedding(hf_config)(q, positions)
    expected, _ = apply_rotary_pos_emb(q, q, cos, sin)

    ours_cos, ours_sin = MultimodalRotaryEmbedding(HEAD_DIM, BASE, section)(positions)
    assert ours_cos.shape == (seq, batch, 1, HEAD_DIM)
    got = apply_rotary(q.permute(2, 0, 1, 3), ours_cos, ours_sin).permute(1, 2, 0, 3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mrope_on_text_positions_is_the_1d_rotary() -> None:
    """Text tokens have one position on all three axes: the tables equal the 1-D rotary's."""
    positions = torch.arange(9).expand(2, 9)
    mrope = MultimodalRotaryEmbedding(HEAD_DIM, BASE, (4, 6, 6))(positions.expand(3, 2, 9))
    plain = RotaryEmbedding(HEAD_DIM, BASE)(positions)
    for ours, reference in zip(mrope, plain):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_position_ids_must_match_the_rotary() -> None:
    state = ParallelState.single("cpu")
    mrope = replace(language_config(), mrope_section=(2, 1, 1))  # head_dim 8: 4 pairs
    assert mrope.problems(ParallelConfig()) == []
    hidden = torch.randn(5, 2, 64)
    model = LanguageModel(mrope, state, sequence_parallel=False, post_process=False)
    with pytest.raises(ValueError, match=r"takes \[3, b, s\] \(language.mrope_section is set"):
        model(hidden, position_ids=torch.arange(5).expand(2, 5))
    assert model(hidden, position_ids=torch.arange(5).expand(3, 2, 5))["hidden_states"].shape == (5, 2, 64)
    plain = LanguageModel(language_config(), state, sequence_parallel=False, post_process=False)
    with pytest.raises(ValueError, match=r"takes \[b, s\]"):
        plain(hidden, position_ids=torch.arange(5).expand(3, 2, 5))


def test_mrope_section_and_video_token_are_validated() -> None:
    parallel = ParallelConfig()
    problems = replace(language_config(), mrope_section=(2, 2, 2)).problems(parallel)
    assert problems == [("language.mrope_section [2, 2, 2] sums to 6; it splits the 4 rotary pairs of a head "
                        "(head_dim 8 / 2)")]
    problems = replace(language_config(), mrope_section=(2, 2)).problems(parallel)
    assert len(problems) == 1 and "expected 3 counts >= 0" in problems[0]
    problems = replace(language_config(), video_token_id=99).problems(parallel)
    assert problems == [("language.video_token_id 99 equals image_token_id: the model could not tell video "
                        "positions from image positions")]
    problems = replace(language_config(), video_token_id=100).problems(parallel)
    assert problems == ["language.video_token_id 100 not in the vocabulary [0, 100)"]
