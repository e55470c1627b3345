"""Rope, norms, attention and activation recompute on one process."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from megamm.parallel.params import initialize_parameters
from megamm.parallel.state import ParallelState
from megamm.transformer.attention import SelfAttention
from megamm.transformer.layer import TransformerBlock
from megamm.transformer.norm import Norm
from megamm.transformer.rope import RotaryEmbedding, apply_rotary
from tests.tiny import language_config


def test_rope_pairs_channel_i_with_i_plus_half() -> None:
    """Each pair (x_i, x_{i+d/2}) rotates by angle pos * base^(-2i/d), written out by hand."""
    d, base = 8, 500.0
    x = torch.randn(5, 2, 3, d)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    cos, sin = RotaryEmbedding(d, base)(positions)
    rotated = apply_rotary(x, cos, sin)
    expected = torch.empty_like(x)
    for s in range(5):
        for b in range(2):
            for i in range(d // 2):
                angle = positions[b, s].item() * base ** (-2 * i / d)
                a, c = x[s, b, :, i], x[s, b, :, i + d // 2]
                expected[s, b, :, i] = a * math.cos(angle) - c * math.sin(angle)
                expected[s, b, :, i + d // 2] = c * math.cos(angle) + a * math.sin(angle)
    torch.testing.assert_close(rotated, expected, rtol=1e-5, atol=1e-5)


def test_rmsnorm_and_layernorm() -> None:
    state = ParallelState.single()
    x = torch.randn(3, 2, 6)
    rms = Norm(6, "rmsnorm", 1e-6, state, False, torch.float32)
    layer = Norm(6, "layernorm", 1e-6, state, False, torch.float32)
    initialize_parameters(rms, 0, None)
    initialize_parameters(layer, 0, None)
    torch.testing.assert_close(rms(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
    torch.testing.assert_close(layer(x), torch.nn.functional.layer_norm(x, (6,), eps=1e-6))
    with pytest.raises(ValueError, match="unknown normalization"):
        Norm(6, "batchnorm", 1e-6, state, False, torch.float32)


def _naive_attention(q, k, v, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on [b, heads, s, d] with GQA expansion, written out."""
    repeat = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(repeat, dim=1)
    v = v.repeat_interleave(repeat, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = q.shape[2]
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("causal", [True, False])
def test_attention_core_matches_naive_gqa(causal: bool) -> None:
    config = replace(language_config().transformer, causal=causal)
    attention = SelfAttention(config, ParallelState.single(), sequence_parallel=False)
    q = torch.randn(2, 8, 5, 8)
    k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    torch.testing.assert_close(attention._core(q, k, v, None), _naive_attention(q, k, v, causal))


def test_attention_mask_combines_with_causality() -> None:
    """Masking the last key must not change the outputs of queries that could not see it anyway."""
    config = language_config().transformer
    attention = SelfAttention(config, ParallelState.single(), sequence_parallel=False)
    q, k, v = torch.randn(1, 8, 4, 8), torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8)
    mask = torch.tensor([True, True, True, False]).view(1, 1, 1, 4)
    masked = attention._core(q, k, v, mask)
    plain = attention._core(q, k, v, None)
    torch.testing.assert_close(masked[:, :, :3], plain[:, :, :3])
    expected_last = _naive_attention(q[:, :, 3:], k[:, :, :3], v[:, :, :3], causal=False)
    torch.testing.assert_close(masked[:, :, 3:], expected_last)


def _block_grads(recompute: str, seed: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    config = replace(
        language_config().transformer, recompute=recompute, attention_dropout=0.2, hidden_dropout=0.2
    )
    state = ParallelState.single()
    state.seed(seed)
    block = TransformerBlock(config, state, sequence_parallel=False, layer_numbers=range(config.num_layers))
    initialize_parameters(block, seed, None)
    x = torch.randn(6, 2, config.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = block(x)
    (out * out).sum().backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    grads["input"] = x.grad
    return out.detach(), grads


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recompute_replays_dropout_exactly(recompute: str) -> None:
    out, grads = _block_grads("none")
    out_recomputed, grads_recomputed = _block_grads(recompute)
    torch.testing.assert_close(out_recomputed, out, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_recomputed[name], grad, rtol=1e-6, atol=1e-7, msg=name)
