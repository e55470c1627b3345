"""The generation loop: a batch of prompts with images -> new tokens, with a KV cache.

Prompts of different lengths are left-padded to one width, so every sequence's next token comes
from the same (last) column and one forward serves the whole batch. The padding is kept out of
everything a real token sees:

- Attention: the mask `[b, 1, s_q, s_k]` lets a query attend the real keys (causality is added by
  the attention core). A padding query may attend only itself: a row with nothing to attend would
  give NaN, and a NaN value at a masked key still poisons real rows (0 * NaN in the weighted sum).
- Positions: each sequence counts from 0 at its first real token (`cumsum(mask) - 1`), so rotary
  embeddings see the same positions as when the prompt runs alone.

Batched results therefore equal one-at-a-time results (up to floating-point rounding of the
differently shaped matrix products; the tests check tokens are equal and logits close).

Each step runs the tokens the cache has not seen: the whole prompt first (prefill: images are
encoded once, here), then one token. `use_cache=False` recomputes the whole sequence every step
instead; it is the reference the cache is tested against. Sequences that hit a stop token are done
(the stop token is not part of the answer) but keep riding along in the batch until every sequence
is done or `max_new_tokens` is reached; their extra tokens are discarded.

Tensor parallelism: every tp rank runs the same loop on the same batch; logits are gathered to the
full vocabulary and rank 0's token choice is broadcast (`megamm.inference.logits`). Pipeline
parallelism is refused for now: the loop would have to pass each step's activations along the
stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from megamm.inference.logits import agree_on_tokens, full_vocab_logits
from megamm.inference.sampling import SamplingConfig, choose_tokens, make_generators
from megamm.models.llava import LlavaModel
from megamm.transformer.kv_cache import KVCache


@dataclass
class Prompt:
    """One sequence to continue.

    input_ids: the rendered prompt, each image placeholder already expanded to its image-token ids
        (`megamm.data.templates.render_prompt`).
    pixel_values: `[n, C, H, W]`, the prompt's n vision-tower inputs (images, or tiles and
        thumbnails) in placeholder order, or None.
    """

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None


@dataclass(frozen=True)
class GenerationConfig:
    """max_new_tokens: most tokens generated per sequence (a stop token ends it earlier).
    stop_token_ids: ids that end a sequence (not included in its tokens).
    seed: sequence i of a `generate` call samples from a generator seeded with seed + i (unless the
        call gives seeds): the same seed gives the same tokens, batched or not.
    use_cache: False recomputes the whole sequence each step (slow; the reference for tests).
    return_logits: keep each step's full-vocabulary logits `[steps, V]` (tests, scoring).
    """

    max_new_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0
    use_cache: bool = True
    return_logits: bool = False

    def problems(self) -> list[str]:
        found = self.sampling.problems()
        if self.max_new_tokens < 1:
            found.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        return found


@dataclass
class Generation:
    """tokens: the new tokens (without the stop token); finish_reason: "stop" (a stop token came) or
    "length" (max_new_tokens reached); logits: `[len(tokens) (+1 with a stop), V]` fp32 when asked."""

    tokens: list[int]
    finish_reason: Literal["stop", "length"]
    logits: torch.Tensor | None = None


class GenerationError(ValueError):
    """A request the generation loop cannot serve; the message says what and why."""


def _check(model: LlavaModel, prompts: Sequence[Prompt], config: GenerationConfig, pad_id: int) -> None:
    state = model.state
    if state.pp_size > 1 or not (model.pre_process and model.post_process):
        raise NotImplementedError(
            "pipeline-parallel generation is not supported: run with pipeline-model-parallel size 1 "
            "(a checkpoint trained with pipelining loads at any layout)"
        )
    if model.language.sequence_parallel:
        raise GenerationError("build the model with sequence_parallel=False for generation")
    if state.cp_size > 1:
        raise GenerationError(
            f"generation runs at context-parallel size 1 (got {state.cp_size}): the KV cache holds whole "
            "sequences (a checkpoint trained with context parallelism loads at any layout)"
        )
    problems = config.problems()
    if not prompts:
        problems.append("no prompts given")
    problems += [f"prompt {i} has no tokens" for i, p in enumerate(prompts) if not p.input_ids]
    language = model.config.language
    if not 0 <= pad_id < language.vocab_size or pad_id == language.image_token_id:
        problems.append(f"pad id {pad_id} must be a vocabulary id other than the image token {language.image_token_id}")
    limit = language.transformer.max_position_embeddings
    longest = max((len(p.input_ids) for p in prompts), default=0) + config.max_new_tokens
    if longest > limit:
        problems.append(
            f"the longest prompt plus max_new_tokens is {longest} positions, more than the model's "
            f"max_position_embeddings {limit}"
        )
    if problems:
        raise GenerationError("cannot generate:\n  - " + "\n  - ".join(problems))


def _attention_mask(valid: torch.Tensor, start: int) -> torch.Tensor | None:
    """valid `[b, s_k]` real-token flags -> `[b, 1, s_k - start, s_k]` mask for queries start..s_k-1
    (None when nothing is padding: plain causal attention)."""
    if bool(valid.all()):
        return None
    keys = valid.shape[1]
    own = torch.arange(start, keys, device=valid.device)[:, None] == torch.arange(keys, device=valid.device)
    return valid[:, None, None, :] | own


def _last_logits(
    model: LlavaModel,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    images_per_sample: list[int] | None,
    cache: KVCache | None,
) -> torch.Tensor:
    """Local (vocab-parallel) logits of the last position, `[b, V_pad/tp]`."""
    hidden = model.embed(input_ids, pixel_values, images_per_sample)
    out = model.language(hidden, position_ids=positions, attention_mask=mask, return_logits=True, kv_cache=cache)
    return out["logits"][-1]


@torch.no_grad()
def generate(
    model: LlavaModel,
    prompts: Sequence[Prompt],
    config: GenerationConfig,
    *,
    pad_id: int = 0,
    seeds: Sequence[int] | None = None,
) -> list[Generation]:
    """Continue every prompt; one `Generation` per prompt, in order.

    pad_id: the id in padding positions (never attended; any vocabulary id but the image token).
    seeds: one sampling seed per prompt (default `config.seed + i`).
    The image token is never generated: it would ask for an image embedding that does not exist.
    """
    _check(model, prompts, config, pad_id)
    state, device = model.state, model.state.device
    language = model.config.language
    batch = len(prompts)
    width = max(len(p.input_ids) for p in prompts)
    total = width + config.max_new_tokens
    ids = torch.full((batch, total), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((batch, total), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt.input_ids) : width] = torch.tensor(prompt.input_ids, dtype=torch.long)
        valid[row, width - len(prompt.input_ids) : width] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    images = [p.pixel_values for p in prompts if p.pixel_values is not None and p.pixel_values.shape[0] > 0]
    pixel_values = torch.cat(images).to(device) if images else None
    images_per_sample = [0 if p.pixel_values is None else int(p.pixel_values.shape[0]) for p in prompts]
    if seeds is not None and len(seeds) != batch:
        raise GenerationError(f"{len(seeds)} seeds for {batch} prompts")
    seeds = list(seeds) if seeds is not None else [config.seed + i for i in range(batch)]
    generators = None if config.sampling.greedy else make_generators(seeds, device)
    cache = KVCache(batch, total) if config.use_cache else None
    stop = set(config.stop_token_ids)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    reasons: list[str | None] = [None] * batch
    kept: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    was_training = model.training
    model.eval()
    try:
        for step in range(config.max_new_tokens):
            end = width + step
            start = cache.length if cache is not None else 0
            with_images = start == 0
            local = _last_logits(
                model, ids[:, start:end], positions[:, start:end], _attention_mask(valid[:, :end], start),
                pixel_values if with_images else None, images_per_sample if with_images else None, cache,
            )
            logits = full_vocab_logits(local, state, language.vocab_size)
            logits[:, language.image_token_id] = float("-inf")
            chosen = agree_on_tokens(choose_tokens(logits, config.sampling, generators), state)
            ids[:, end] = chosen
            valid[:, end] = True
            positions[:, end] = positions[:, end - 1] + 1
            for row, token in enumerate(chosen.tolist()):
                if reasons[row] is not None:
                    continue
                if config.return_logits:
                    kept[row].append(logits[row].cpu())
                if token in stop:
                    reasons[row] = "stop"
                    continue
                tokens[row].append(token)
                if len(tokens[row]) == config.max_new_tokens:
                    reasons[row] = "length"
            if all(reason is not None for reason in reasons):
                break
    finally:
        model.train(was_training)
    return [
        Generation(tokens[row], reasons[row], torch.stack(kept[row]) if config.return_logits else None)
        for row in range(batch)
    ]
