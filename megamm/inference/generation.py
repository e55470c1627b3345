"""The generation loop: a batch of prompts with images -> new tokens, with a KV cache.

Prompts of different lengths are left-padded to one width, so every sequence's next token comes
from the same (last) column and one forward serves the whole batch. The padding is kept out of
everything a real token sees:

- Attention: the mask `[b, 1, s_q, s_k]` lets a query attend the real keys (causality is added by
  the attention core). A padding query may attend only itself: a row with nothing to attend would
  give NaN, and a NaN value at a masked key still poisons real rows (0 * NaN in the weighted sum).
- Positions: each sequence counts from 0 at its first real token (`cumsum(mask) - 1`), so rotary
  embeddings see the same positions as when the prompt runs alone. With M-RoPE (the Qwen2-VL
  family) a prompt's positions `[3, n]` come from megamm.data.mrope (its images' and videos'
  grids), and generated token k gets `n + k + delta` on all three axes, `delta` being the
  prompt's `mrope_position_delta` (transformers' `rope_deltas`): the next position after the
  largest one the prompt used.

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

from megamm.data.mrope import mrope_position_ids
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
        thumbnails) in placeholder order, or None. A native-resolution tower (the Qwen2-VL family):
        `[image patches, C*T*P*P]` with image_grid_thw `[n, 3]`, and videos likewise
        (megamm.data.native_resolution, megamm.data.video); video_seconds_per_grid: each video's
        `second_per_grid` (Qwen2.5-VL's M-RoPE counts video positions in seconds). An any-resolution
        model (LLaVA-NeXT): `[tiles, C, H, W]`, each image's base image and tiles, with image_sizes
        `[n, 2]`, each image's original (height, width) (megamm.data.anyres_images).
    """

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    video_seconds_per_grid: tuple[float, ...] = ()
    image_sizes: torch.Tensor | None = None


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
    vision_tokens = _vision_token_ids(model)
    if not 0 <= pad_id < language.vocab_size or pad_id in vision_tokens:
        problems.append(f"pad id {pad_id} must be a vocabulary id other than the image and video tokens "
                        f"{list(vision_tokens)}")
    if not model.native:
        given = [i for i, p in enumerate(prompts)
                 if p.image_grid_thw is not None or p.pixel_values_videos is not None or p.video_grid_thw is not None]
        problems += [f"prompt {i}: grids and videos are inputs of a native-resolution tower; the "
                     f"{model.config.vision.family} tower takes images [n, C, H, W]" for i in given]
    anyres = model.config.anyres is not None
    problems += [f"prompt {i}: image_sizes is an input of an any-resolution model (config.anyres)"
                 for i, p in enumerate(prompts) if p.image_sizes is not None and not anyres]
    problems += [f"prompt {i}: an any-resolution model needs image_sizes with pixel_values (each image's size)"
                 for i, p in enumerate(prompts) if anyres and (p.pixel_values is None) != (p.image_sizes is None)]
    limit = language.transformer.max_position_embeddings
    longest = max((len(p.input_ids) for p in prompts), default=0) + config.max_new_tokens
    if longest > limit:
        problems.append(
            f"the longest prompt plus max_new_tokens is {longest} positions, more than the model's "
            f"max_position_embeddings {limit}"
        )
    if problems:
        raise GenerationError("cannot generate:\n  - " + "\n  - ".join(problems))


def _vision_token_ids(model: LlavaModel) -> tuple[int, ...]:
    """The ids that stand for vision embeddings (never generated, never padding)."""
    language = model.config.language
    return tuple(i for i in (language.image_token_id, language.video_token_id) if i is not None)


def _prompt_mrope_positions(model: LlavaModel, prompt: Prompt) -> torch.Tensor:
    """`[3, n]` M-RoPE positions of a prompt, from its images' and videos' grids (a fixed-size
    tower's image tokens count as text: its images have no grid)."""
    native = model.config.vision.native_resolution
    if native is None:
        return torch.arange(len(prompt.input_ids)).expand(3, -1)
    tokens_per_second = native.tokens_per_second
    video_token = model.config.language.video_token_id
    return mrope_position_ids(
        prompt.input_ids,
        image_token_id=model.config.language.image_token_id,
        # No video token configured: -1 matches no id, so every other token is text or image.
        video_token_id=-1 if video_token is None else video_token,
        spatial_merge_size=native.spatial_merge_size,
        image_grid_thw=() if prompt.image_grid_thw is None else prompt.image_grid_thw,
        video_grid_thw=() if prompt.video_grid_thw is None else prompt.video_grid_thw,
        second_per_grid_ts=list(prompt.video_seconds_per_grid) if tokens_per_second is not None else None,
        tokens_per_second=tokens_per_second,
    )


def _concat(tensors: list[torch.Tensor | None], device: torch.device) -> torch.Tensor | None:
    present = [t for t in tensors if t is not None and t.shape[0] > 0]
    return torch.cat(present).to(device) if present else None


def _vision_inputs(model: LlavaModel, prompts: Sequence[Prompt], device: torch.device) -> dict:
    """The prefill's images (and videos) in batch order, with their per-prompt counts."""
    inputs: dict = {
        "pixel_values": _concat([p.pixel_values for p in prompts], device),
        "images_per_sample": [0 if p.pixel_values is None else int(p.pixel_values.shape[0]) for p in prompts],
    }
    if model.config.anyres is not None:
        inputs["images_per_sample"] = [0 if p.image_sizes is None else int(p.image_sizes.shape[0]) for p in prompts]
        inputs["image_sizes"] = _concat([p.image_sizes for p in prompts], device)
    if model.native:
        inputs["images_per_sample"] = [0 if p.image_grid_thw is None else int(p.image_grid_thw.shape[0])
                                       for p in prompts]
        inputs["image_grid_thw"] = _concat([p.image_grid_thw for p in prompts], device)
        inputs["pixel_values_videos"] = _concat([p.pixel_values_videos for p in prompts], device)
        inputs["video_grid_thw"] = _concat([p.video_grid_thw for p in prompts], device)
        inputs["videos_per_sample"] = [0 if p.video_grid_thw is None else int(p.video_grid_thw.shape[0])
                                       for p in prompts]
    return inputs


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
    vision: dict,
    cache: KVCache | None,
) -> torch.Tensor:
    """Local (vocab-parallel) logits of the last position, `[b, V_pad/tp]`; `vision`: the prefill's
    image (and video) inputs (`_vision_inputs`), empty afterwards."""
    hidden = model.embed(input_ids, vision.get("pixel_values"), vision.get("images_per_sample"),
                         **{k: v for k, v in vision.items() if k not in ("pixel_values", "images_per_sample")})
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

    pad_id: the id in padding positions (never attended; any vocabulary id but the image and video tokens).
    seeds: one sampling seed per prompt (default `config.seed + i`).
    The image and video tokens are never generated: they would ask for embeddings that do not exist.
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
    mrope = model.language.position_axes > 1
    if mrope:
        # [3, b, total]: each prompt's own positions, then (next_position + k) on every axis.
        positions = positions.expand(3, -1, -1).clone()
        next_position = torch.zeros(batch, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            prompt_positions = _prompt_mrope_positions(model, prompt)
            positions[:, row, width - len(prompt.input_ids) : width] = prompt_positions.to(device)
            next_position[row] = int(prompt_positions.max()) + 1
    vision = _vision_inputs(model, prompts, device)
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
                model, ids[:, start:end], positions[..., start:end], _attention_mask(valid[:, :end], start),
                vision if with_images else {}, cache,
            )
            logits = full_vocab_logits(local, state, language.vocab_size)
            logits[:, list(_vision_token_ids(model))] = float("-inf")
            chosen = agree_on_tokens(choose_tokens(logits, config.sampling, generators), state)
            ids[:, end] = chosen
            valid[:, end] = True
            if mrope:
                positions[..., end] = next_position + step
            else:
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
