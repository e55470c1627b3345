"""Choosing the next token from full-vocabulary logits: greedy, temperature, top-k and top-p.

Sampling draws from one generator per sequence, so a sequence's tokens depend on its own seed only,
not on which other sequences share its batch or where it sits in it (batched and one-at-a-time
generation give the same tokens). The draw is the "exponential race": with E_i ~ Exp(1) from the
sequence's generator, argmax_i p_i / E_i is distributed as Categorical(p). It takes the same number
of random values every step whatever p is, and an argmax moves only if two candidates are nearly
tied, whereas inverse-CDF sampling (`torch.multinomial`) flips to another token whenever a rounding
difference in p moves a cumulative sum across the uniform draw. That keeps the KV-cache path and the
tp > 1 path on the same tokens as the reference computations they are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy (the other fields are then unused); top_k 0 and top_p 1 turn those off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def problems(self) -> list[str]:
        found = []
        if self.temperature < 0:
            found.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            found.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            found.append(f"top_p must be in (0, 1], got {self.top_p}")
        return found

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """`[b, V]` logits / temperature with the tokens outside top-k and the top-p nucleus set to -inf.

    Top-p keeps the smallest set of most likely tokens whose probability reaches top_p (at least one
    token); it is applied after top-k, on the distribution top-k left.
    """
    logits = logits / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # Mass before each token; a token is dropped once the tokens before it reach top_p.
        before = probs.cumsum(dim=-1) - probs
        drop = before >= config.top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def make_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per sequence, seeded with its seed, on the device the logits live on."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def choose_tokens(
    logits: torch.Tensor, config: SamplingConfig, generators: list[torch.Generator] | None
) -> torch.Tensor:
    """`[b, V]` fp32 logits -> `[b]` token ids (generators: one per row, needed unless greedy)."""
    if config.greedy:
        return logits.argmax(dim=-1)
    if generators is None or len(generators) != logits.shape[0]:
        raise ValueError(f"sampling needs one generator per sequence ({logits.shape[0]})")
    probs = filter_logits(logits, config).softmax(dim=-1)
    races = torch.stack(
        [torch.empty(logits.shape[-1], device=logits.device).exponential_(generator=g) for g in generators]
    )
    return (probs / races).argmax(dim=-1)
