"""Rotary position embedding in the Hugging Face "rotate half" layout.

Channel i of a head is paired with channel i + d/2 (not with i + 1 as in the interleaved/complex
layout), which is how Hugging Face LLaMA/Mistral checkpoints store q and k; using the same pairing
means converted weights need no permutation.
"""

from __future__ import annotations

import torch
from torch import nn

from megamm import kernels


class RotaryEmbedding(nn.Module):
    """Produces `cos, sin` of shape `[s, b, 1, d]` for the given positions."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: `[b, s]` integer positions -> (cos, sin), each `[s, b, 1, d]` in fp32."""
        angles = position_ids.to(self.inv_freq.device).float().transpose(0, 1).unsqueeze(-1) * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)
        return angles.cos(), angles.sin()


class MultimodalRotaryEmbedding(nn.Module):
    """M-RoPE (Qwen2-VL's language model): each rotary pair turns by one of three positions.

    The `d / 2` frequencies are cut into runs of `section` = (temporal, height, width) lengths and
    run i takes its angles from axis `i % 3` (transformers' `recomposition_frequencies`, formerly
    `apply_multimodal_rotary_pos_emb`); the result is duplicated for the rotate-half pairing. The
    tables have the 1-D rotary's shape, so applying them is the same op (`apply_rotary`, fused
    kernel included): only how the angles are gathered differs. Text tokens carry the same position
    on all three axes, so on text M-RoPE equals the 1-D rotary.
    """

    def __init__(self, head_dim: int, base: float, section: tuple[int, ...]) -> None:
        super().__init__()
        if sum(section) * 2 != head_dim:
            raise ValueError(f"mrope_section {list(section)} must sum to head_dim / 2 = {head_dim // 2}")
        self.section = tuple(section)
        self.axial = RotaryEmbedding(head_dim, base)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: `[3, b, s]` integer positions -> (cos, sin), each `[s, b, 1, d]` in fp32."""
        if position_ids.dim() != 3 or position_ids.shape[0] != len(self.section):
            raise ValueError(f"M-RoPE needs position ids [{len(self.section)}, b, s] (temporal, height, width; "
                             f"megamm.data.mrope), got shape {tuple(position_ids.shape)}")
        inv_freq = self.axial.inv_freq
        angles = position_ids.to(inv_freq.device).float().transpose(1, 2).unsqueeze(-1) * inv_freq  # [3, s, b, d/2]
        runs = angles.split(self.section, dim=-1)
        angles = torch.cat([run[i % len(self.section)] for i, run in enumerate(runs)], dim=-1)
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)
        return angles.cos(), angles.sin()


class AxialRotaryEmbedding(nn.Module):
    """Rotary angles over several position axes (the 2D vision rotary: height, width).

    Each axis gets the frequencies of a `head_dim / axes`-wide rotary; the per-axis angles are
    concatenated and then duplicated for the rotate-half pairing, so with two axes the channels
    `[0, d/4)` rotate by height, `[d/4, d/2)` by width, and `[d/2, d)` repeat them (the layout of
    Hugging Face's Qwen2-VL vision rotary, so its q/k weights need no permutation).
    """

    def __init__(self, head_dim: int, axes: int, base: float) -> None:
        super().__init__()
        if head_dim % (2 * axes):
            raise ValueError(f"axial rotary: head_dim {head_dim} not divisible by 2 x {axes} axes")
        self.axial = RotaryEmbedding(head_dim // axes, base)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: `[s, axes]` integer positions -> (cos, sin), each `[s, 1, 1, head_dim]` in fp32."""
        inv_freq = self.axial.inv_freq
        angles = (positions.to(inv_freq.device).float().unsqueeze(-1) * inv_freq).flatten(1)  # [s, d/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None, None, :]
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: `[s, b, heads, d]`; cos, sin: `[s, b, 1, d]`. Computed in fp32, returned in x's dtype
    (`megamm.kernels.reference.apply_rotary`, or the fused kernel where enabled)."""
    return kernels.apply_rotary(x, cos, sin)
