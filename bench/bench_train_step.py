"""Time one optimizer train step of the same LLaVA model in megamm and in Hugging Face transformers,
each eager and compiled.

What is measured: the wall time of a full training step (forward, backward, gradient-norm clipping to
1.0 and an AdamW update) on the CPU in fp32, in four modes:

- megamm eager: `LlavaModel` driven by the real training step, `megamm.training.step.train_step` (fp32
  main grad buffer, AdamW over the trainable parameters, clipping), in one process without
  `torch.distributed` (`ParallelState.single()`), built by `build_model_chunks` as training builds it;
- megamm compiled: the same with `--torch-compile` (each transformer layer compiled by
  `torch.compile`, `megamm.transformer.compile`);
- transformers eager: `LlavaForConditionalGeneration` (CLIP vision tower + LLaMA decoder, SDPA
  attention) with `loss.backward()`, `torch.nn.utils.clip_grad_norm_`, `torch.optim.AdamW.step()` and
  `zero_grad()`;
- transformers compiled: the same with the whole Hugging Face model compiled (`model.compile()`,
  graph breaks where its forward has them).

All four models have the same shapes (CLIP-style ViT whose penultimate layer feeds a 2-layer GELU
projector with the class token dropped, LLaMA decoder with GQA) and start from the same weights: the
Hugging Face model is initialized at random and its weights are copied into the others, so the step-0
losses must agree to float precision (printed as a sanity check, with ln(vocab) for reference). Every
step gets a fresh batch (one image per sample, one image token per patch embedding), the same for all.

Two configurations (`--config`): `default` (ViT 256 x 4 layers at 64 px, LLaMA 512 x 6 layers, vocab
8000, batch 4 x 256) and `large` (CLIP 4 layers of 384 at 224 px with 14 px patches, LLaMA 4 layers of
512, vocab 32000, batch 2 x 512).

All run in one process with the same number of threads. The warm-up steps (which compile the compiled
modes; their first step's time is printed as the compile time) are not timed. Then the modes are timed
alternately, each step in a rotated order, so that drifts in machine speed hit all of them. The report
gives, per mode, the median wall time per step with its spread (min, max and the interquartile range),
the median CPU time of the process per step and tokens per second, then each mode's speed relative to
transformers eager (transformers eager median / mode median: above 1 is faster), the median of the
per-step ratios and the ratio of the fastest steps (the least disturbed by other load on a shared
machine). The loss after the last step is printed too: with equal weights, batches and optimizer
settings the runs should stay together. The load average before and after is printed because a busy
machine skews every number.

Each library does its own amount of work for the same model: Hugging Face runs all CLIP layers (and the
post-layernorm) and then picks `hidden_states[-2]`; megamm stops after the selected layer and freezes
the layers after it, as its vision tower is designed to. Hugging Face computes the logits at every
position and then ignores the image tokens' and BOS's; megamm runs its output layer and cross
entropy at the labeled positions only (docs/training.md, "Batches and the loss"), the same loss.

Run from the repository root with megamm installed (`make install`); several minutes on 2 CPU cores
(compilation included) with the defaults (--config default --steps 10 --warmup 3 --threads <torch's
default> --seed 0):

    python bench/bench_train_step.py
    python bench/bench_train_step.py --config large --steps 8
    python bench/bench_train_step.py --modes megamm-eager transformers-eager --steps 20
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration
from transformers import LlavaConfig as HFLlavaConfig

from megamm.config import (
    LanguageConfig,
    LlavaConfig,
    ProjectorConfig,
    TransformerConfig,
    VisionConfig,
)
from megamm.config.constants import IGNORE_INDEX
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.models.llava import LlavaModel
from megamm.parallel.state import ParallelState
from megamm.pipeline.chunks import build_model_chunks
from megamm.training.step import Trainer, build_trainer, train_step

Batch = dict[str, torch.Tensor]
BOS_ID = 1
LR = 1e-4
CLIP_GRAD = 1.0


@dataclass(frozen=True)
class Shapes:
    """The one model both libraries build, and the batch it trains on."""

    vit_hidden: int = 256
    vit_layers: int = 4
    vit_heads: int = 4
    vit_ffn: int = 1024
    image_size: int = 64
    patch_size: int = 8
    lm_hidden: int = 512
    lm_layers: int = 6
    lm_heads: int = 8
    lm_kv_heads: int = 4
    lm_ffn: int = 1376
    vocab: int = 8000
    seq_length: int = 256
    micro_batch: int = 4
    images_per_sample: int = 1

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_token_id(self) -> int:
        return self.vocab - 1

    def describe(self) -> str:
        return (
            f"vision: CLIP-style ViT hidden {self.vit_hidden}, {self.vit_layers} layers, "
            f"{self.vit_heads} heads, ffn {self.vit_ffn}, image {self.image_size}, "
            f"patch {self.patch_size} ({self.patches} patches), "
            f"penultimate layer, class token dropped\n"
            f"projector: mlp2x_gelu {self.vit_hidden} -> {self.lm_hidden} -> {self.lm_hidden}\n"
            f"language: LLaMA hidden {self.lm_hidden}, {self.lm_layers} layers, {self.lm_heads} heads, "
            f"{self.lm_kv_heads} kv heads, ffn {self.lm_ffn}, vocab {self.vocab}\n"
            f"batch: {self.micro_batch} samples x {self.seq_length} tokens, "
            f"{self.images_per_sample} image(s) per sample ({self.patches} image tokens each), fp32"
        )


CONFIGS = {
    "default": Shapes(),
    "large": Shapes(vit_hidden=384, vit_layers=4, vit_heads=6, vit_ffn=1536, image_size=224, patch_size=14,
                    lm_hidden=512, lm_layers=4, lm_heads=8, lm_kv_heads=4, lm_ffn=1376, vocab=32000,
                    seq_length=512, micro_batch=2),
}


# ---- models ------------------------------------------------------------------------------------


def build_hf(shapes: Shapes, seed: int) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=shapes.vit_hidden,
        intermediate_size=shapes.vit_ffn,
        num_hidden_layers=shapes.vit_layers,
        num_attention_heads=shapes.vit_heads,
        image_size=shapes.image_size,
        patch_size=shapes.patch_size,
        num_channels=3,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        vocab_size=shapes.vocab,
        hidden_size=shapes.lm_hidden,
        intermediate_size=shapes.lm_ffn,
        num_hidden_layers=shapes.lm_layers,
        num_attention_heads=shapes.lm_heads,
        num_key_value_heads=shapes.lm_kv_heads,
        max_position_embeddings=shapes.seq_length,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )
    config = HFLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=shapes.image_token_id,
        image_seq_length=shapes.patches,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return model.train()


def build_megamm_config(shapes: Shapes) -> LlavaConfig:
    vision = TransformerConfig(
        hidden_size=shapes.vit_hidden,
        num_layers=shapes.vit_layers,
        num_attention_heads=shapes.vit_heads,
        ffn_hidden_size=shapes.vit_ffn,
        normalization="layernorm",
        norm_epsilon=1e-5,
        activation="quick_gelu",
        add_bias_linear=True,
        position_embedding="learned",
        causal=False,
    )
    language = TransformerConfig(
        hidden_size=shapes.lm_hidden,
        num_layers=shapes.lm_layers,
        num_attention_heads=shapes.lm_heads,
        num_query_groups=shapes.lm_kv_heads,
        ffn_hidden_size=shapes.lm_ffn,
        norm_epsilon=1e-5,
        rotary_base=10000.0,
        max_position_embeddings=shapes.seq_length,
    )
    return LlavaConfig(
        vision=VisionConfig(
            vision,
            image_size=shapes.image_size,
            patch_size=shapes.patch_size,
            select_layer=-2,
            drop_class_token=True,
        ),
        # make_vocab_size_divisible_by=64 divides 8000: no padded rows, the same table as Hugging Face.
        language=LanguageConfig(
            language,
            vocab_size=shapes.vocab,
            image_token_id=shapes.image_token_id,
            make_vocab_size_divisible_by=64,
        ),
        projector=ProjectorConfig(type="mlp2x_gelu"),
    )


def build_megamm(shapes: Shapes, total_steps: int, seed: int, torch_compile: bool) -> Trainer:
    run_config = RunConfig(
        model=build_megamm_config(shapes),
        training=TrainingConfig(
            micro_batch_size=shapes.micro_batch,
            global_batch_size=shapes.micro_batch,
            seq_length=shapes.seq_length,
            train_iters=total_steps,
            lr=LR,
            lr_decay_style="constant",
            weight_decay=0.0,
            clip_grad=CLIP_GRAD,
            seed=seed,
            mock_data=True,  # required by the validation; the batches below are built here
            images_per_sample=shapes.images_per_sample,
            torch_compile=torch_compile,
        ),
    )
    resolved = resolve(run_config, world_size=1)
    state = ParallelState.single()
    state.seed(seed)
    return build_trainer(resolved, state, build_model_chunks(resolved, state))


def hf_to_megamm(hf: nn.Module, shapes: Shapes) -> dict[str, torch.Tensor]:
    """Hugging Face LLaVA state dict -> megamm `LlavaModel` parameter names (fused QKV and gate/up)."""
    state = {}
    for key, value in hf.state_dict().items():
        key = key.replace("vision_tower.vision_model.", "vision_tower.")
        state[key.removeprefix("model.")] = value
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        return state.pop(key)

    vt = "vision_tower."
    out["vision.patch_embedding"] = take(vt + "embeddings.patch_embedding.weight")
    out["vision.class_embedding"] = take(vt + "embeddings.class_embedding")
    out["vision.position_embedding"] = take(vt + "embeddings.position_embedding.weight")
    for kind in ("weight", "bias"):
        out[f"vision.pre_norm.{kind}"] = take(vt + f"pre_layrnorm.{kind}")
    for i in range(shapes.vit_layers):
        src, dst = f"{vt}encoder.layers.{i}.", f"vision.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [take(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}self_attention.qkv.{kind}"] = torch.cat(qkv)
            out[f"{dst}self_attention.proj.{kind}"] = take(f"{src}self_attn.out_proj.{kind}")
            out[f"{dst}mlp.fc1.{kind}"] = take(f"{src}mlp.fc1.{kind}")
            out[f"{dst}mlp.fc2.{kind}"] = take(f"{src}mlp.fc2.{kind}")
            out[f"{dst}input_norm.{kind}"] = take(f"{src}layer_norm1.{kind}")
            out[f"{dst}pre_mlp_norm.{kind}"] = take(f"{src}layer_norm2.{kind}")
    for kind in ("weight", "bias"):
        out[f"projector.fc1.{kind}"] = take(f"multi_modal_projector.linear_1.{kind}")
        out[f"projector.fc2.{kind}"] = take(f"multi_modal_projector.linear_2.{kind}")
    lm = "language_model."
    out["language.embedding.weight"] = take(lm + "embed_tokens.weight")
    for i in range(shapes.lm_layers):
        src, dst = f"{lm}layers.{i}.", f"language.decoder.layers.{i}."
        out[f"{dst}self_attention.qkv.weight"] = torch.cat(
            [take(f"{src}self_attn.{p}_proj.weight") for p in "qkv"]
        )
        out[f"{dst}self_attention.proj.weight"] = take(f"{src}self_attn.o_proj.weight")
        out[f"{dst}mlp.fc1.weight"] = torch.cat(
            [take(f"{src}mlp.gate_proj.weight"), take(f"{src}mlp.up_proj.weight")]
        )
        out[f"{dst}mlp.fc2.weight"] = take(f"{src}mlp.down_proj.weight")
        out[f"{dst}input_norm.weight"] = take(f"{src}input_layernorm.weight")
        out[f"{dst}pre_mlp_norm.weight"] = take(f"{src}post_attention_layernorm.weight")
    out["language.final_norm.weight"] = take(lm + "norm.weight")
    out["language.output_layer.weight"] = take("lm_head.weight")
    unused = {key for key in state if not key.startswith(vt + "post_layernorm.")}
    if unused:
        raise KeyError(f"Hugging Face weights left unmapped: {sorted(unused)}")
    return out


@torch.no_grad()
def copy_weights(model: LlavaModel, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    if set(params) != set(weights):
        raise KeyError(
            f"weight mapping mismatch: missing {sorted(set(params) - set(weights))}, "
            f"extra {sorted(set(weights) - set(params))}"
        )
    for name, param in params.items():
        if param.shape != weights[name].shape:
            raise ValueError(
                f"{name}: megamm {tuple(param.shape)} vs Hugging Face {tuple(weights[name].shape)}"
            )
        param.copy_(weights[name])


# ---- data and steps ----------------------------------------------------------------------------


def make_batch(shapes: Shapes, seed: int) -> Batch:
    """[BOS] ([IMG] x patches)* then random text; labels ignore BOS and the image positions."""
    generator = torch.Generator().manual_seed(seed)
    b, s, per_image = shapes.micro_batch, shapes.seq_length, shapes.patches
    input_ids = torch.randint(BOS_ID + 1, shapes.image_token_id, (b, s), generator=generator)
    input_ids[:, 0] = BOS_ID
    image_end = 1 + shapes.images_per_sample * per_image
    input_ids[:, 1:image_end] = shapes.image_token_id
    labels = input_ids.masked_fill(input_ids == shapes.image_token_id, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    pixel_values = torch.randn(
        (b * shapes.images_per_sample, 3, shapes.image_size, shapes.image_size), generator=generator
    )
    images = torch.full((b,), shapes.images_per_sample)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": pixel_values,
        "images_per_sample": images,
    }


class HFStep:
    """forward -> loss.backward() -> clip the grad norm -> AdamW.step() -> zero_grad()."""

    def __init__(self, model: LlavaForConditionalGeneration) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def __call__(self, batch: Batch) -> float:
        loss = self.model(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"]
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP_GRAD)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


class MegammStep:
    """megamm's real training step over one microbatch (global batch = micro batch, dp = 1)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.iteration = 0

    def __call__(self, batch: Batch) -> float:
        result = train_step(self.trainer, [batch], self.iteration)
        self.iteration += 1
        return result.loss


def timed(step: Callable[[Batch], float], batch: Batch) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, loss) of one step."""
    wall, cpu = time.perf_counter(), time.process_time()
    loss = step(batch)
    return time.perf_counter() - wall, time.process_time() - cpu, loss


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def count(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# ---- main --------------------------------------------------------------------------------------


MODES = ("megamm-eager", "megamm-compiled", "transformers-eager", "transformers-compiled")
BASELINE = "transformers-eager"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default", help="model and batch (default: default)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help=f"what to time, alternating (default: all four; {BASELINE} is the reference)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (default: 10)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps per mode first, compilation included (default: 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help=f"torch intra-op threads for all modes (default: {torch.get_num_threads()})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and batches (default: 0)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.threads < 1:
        parser.error("need --steps >= 1, --warmup >= 1 (the compiling step) and --threads >= 1")
    if len(set(args.modes)) != len(args.modes):
        parser.error(f"--modes names a mode twice: {' '.join(args.modes)}")
    return args


def build_steps(modes: list[str], shapes: Shapes, total: int, seed: int) -> dict[str, tuple[Callable[[Batch], float], nn.Module]]:
    """Each mode's step and model, all with the Hugging Face model's initial weights."""
    reference = build_hf(shapes, seed)
    weights = hf_to_megamm(reference, shapes)
    steps: dict[str, tuple[Callable[[Batch], float], nn.Module]] = {}
    for mode in modes:
        library, kind = mode.split("-")
        if library == "megamm":
            trainer = build_megamm(shapes, total, seed, torch_compile=kind == "compiled")
            copy_weights(trainer.model, weights)
            steps[mode] = (MegammStep(trainer), trainer.model)
        else:
            hf = build_hf(shapes, seed)
            hf.load_state_dict(reference.state_dict())
            if kind == "compiled":
                hf.compile()
            steps[mode] = (HFStep(hf), hf)
    return steps


def iqr(values: list[float]) -> float:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return quartiles[2] - quartiles[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = CONFIGS[args.config]
    total = args.warmup + args.steps
    built = build_steps(args.modes, shapes, total, args.seed)
    steps = {mode: step for mode, (step, _) in built.items()}

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s), "
        f"{args.warmup} warm-up + {args.steps} timed steps per mode, seed {args.seed}, config {args.config}"
    )
    print(shapes.describe())

    batches = [make_batch(shapes, args.seed * 100_003 + i) for i in range(total)]
    load_before = load_average()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, list[float]] = {name: [] for name in steps}
    first_step: dict[str, float] = {}
    names = list(steps)
    for i, batch in enumerate(batches):
        # Rotate the order every step so that no mode always runs first (or right after another).
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            seconds, cpu_seconds, loss = timed(steps[name], batch)
            if not math.isfinite(loss):
                raise RuntimeError(f"{name}: non-finite loss {loss} at step {i}")
            losses[name].append(loss)
            if i == 0:
                first_step[name] = seconds
            if i >= args.warmup:
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)

    tokens = shapes.micro_batch * shapes.seq_length
    medians = {name: statistics.median(values) for name, values in wall.items()}
    print(f"load average (1, 5, 15 min): {load_before} before the steps, {load_average()} after")
    print()
    header = f"{'mode':<23}{'params':>12}{'trainable':>12}{'median ms':>11}{'min':>9}{'max':>9}{'IQR':>8}"
    print(header + f"{'CPU ms':>9}{'tokens/s':>10}{'first step s':>14}")
    for name in steps:
        params, trainable = count(built[name][1])
        ms = [1000 * t for t in wall[name]]
        median_ms, cpu_ms = 1000 * medians[name], 1000 * statistics.median(cpu[name])
        print(
            f"{name:<23}{params:>12,}{trainable:>12,}{median_ms:>11.1f}{min(ms):>9.1f}{max(ms):>9.1f}"
            f"{iqr(ms):>8.1f}{cpu_ms:>9.1f}{tokens / medians[name]:>10.0f}{first_step[name]:>14.1f}"
        )
    print()
    print(f"step-0 loss (ln(vocab) = {math.log(shapes.vocab):.6f}): "
          + ", ".join(f"{name} {losses[name][0]:.6f}" for name in steps))
    print(f"last-step loss (step {total - 1}): " + ", ".join(f"{name} {losses[name][-1]:.6f}" for name in steps))
    if BASELINE in steps:
        print(f"speed relative to {BASELINE} ({BASELINE} time / mode time; above 1: faster):")
        print(f"{'mode':<23}{'medians':>9}{'per-step':>10}{'fastest':>9}")
        base = wall[BASELINE]
        for name in steps:
            pairwise = statistics.median(b / m for b, m in zip(base, wall[name], strict=True))
            # Other load only ever adds time, so the fastest steps are the least disturbed ones.
            print(f"{name:<23}{medians[BASELINE] / medians[name]:>9.3f}{pairwise:>10.3f}"
                  f"{min(base) / min(wall[name]):>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
