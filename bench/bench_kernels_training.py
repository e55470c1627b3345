"""Training throughput of a ~1B-parameter LLaVA model in bf16 with the fused kernels on and off.

One process, one GPU, megamm's real training step (`megamm.training.step.train_step`: bf16 compute,
fp32 main grads and master weights, AdamW, clipping), the vision tower frozen as in LLaVA's
instruction-tuning stage. The same model alternates between blocks of steps with every kernel
enabled (`MEGAMM_KERNELS=all`) and with the torch references (`reference`), so drifts in machine
speed hit both; the report gives the median step time, tokens per second (language tokens, image
positions included) and model FLOPs utilization for each, and the speedup.

MFU = model FLOPs per step / (step time x peak bf16 FLOP/s). Model FLOPs: 6 x (trainable language
and projector parameters) x tokens, 2 x (vision parameters used) x image tokens (a frozen tower
runs forward only), and attention's score and context matmuls, 4 x b x s^2 x width per layer
forward (x3 for the language model's forward and backward), counted in full even where causal (the
usual convention). The peak is taken from the device name (H100 SXM/H200 989 TFLOP/s dense bf16, H100 PCIe 756, A100
312) or --peak-tflops.

Default model (~1.0B parameters): CLIP-L-like ViT with 12 layers (hidden 1024, 16 heads, ffn 4096,
336 px, patch 14: 576 patches + class token, penultimate layer), mlp2x_gelu projector, LLaMA-like
decoder hidden 2048, 16 layers, 16 heads, 8 kv heads, ffn 5632, vocabulary 32000; 4 samples x 2048
tokens with one image each. On a GPU machine, from the repository root:

    python bench/bench_kernels_training.py
    python bench/bench_kernels_training.py --steps 20 --micro-batch 2 --attention-backend unfused

`--tiny --device cpu` runs a tiny model for a few steps on the CPU: a check that the script works,
not a measurement (no kernel runs on the CPU, so both modes use the references).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch

from megamm.config import LanguageConfig, LlavaConfig, ProjectorConfig, TransformerConfig, VisionConfig
from megamm.config.constants import IGNORE_INDEX
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.kernels import kernel_mode
from megamm.models.llava import LlavaModel
from megamm.parallel.state import ParallelState
from megamm.training.step import Trainer, build_trainer, train_step

# Dense bf16 peaks; the first name found in the device name wins (PCIe before the SXM default).
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
MODES = ("reference", "all")


@dataclass(frozen=True)
class Shapes:
    vit_hidden: int = 1024
    vit_layers: int = 12
    vit_heads: int = 16
    vit_ffn: int = 4096
    image_size: int = 336
    patch_size: int = 14
    lm_hidden: int = 2048
    lm_layers: int = 16
    lm_heads: int = 16
    lm_kv_heads: int = 8
    lm_ffn: int = 5632
    vocab: int = 32000
    seq_length: int = 2048
    micro_batch: int = 4

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


TINY = Shapes(64, 3, 4, 128, 32, 8, 64, 2, 4, 2, 128, 512, 64, 2)


def build_config(shapes: Shapes, attention_backend: str) -> LlavaConfig:
    vision = TransformerConfig(
        hidden_size=shapes.vit_hidden, num_layers=shapes.vit_layers, num_attention_heads=shapes.vit_heads,
        ffn_hidden_size=shapes.vit_ffn, normalization="layernorm", activation="quick_gelu", add_bias_linear=True,
        position_embedding="learned", causal=False, attention_backend=attention_backend,
    )
    language = TransformerConfig(
        hidden_size=shapes.lm_hidden, num_layers=shapes.lm_layers, num_attention_heads=shapes.lm_heads,
        num_query_groups=shapes.lm_kv_heads, ffn_hidden_size=shapes.lm_ffn,
        max_position_embeddings=shapes.seq_length, attention_backend=attention_backend,
    )
    return LlavaConfig(
        vision=VisionConfig(vision, image_size=shapes.image_size, patch_size=shapes.patch_size),
        language=LanguageConfig(language, vocab_size=shapes.vocab, image_token_id=shapes.vocab - 1),
        projector=ProjectorConfig(type="mlp2x_gelu"),
    )


def build_trainer_for(shapes: Shapes, config: LlavaConfig, device: str, steps: int) -> Trainer:
    run_config = RunConfig(
        model=config,
        training=TrainingConfig(
            micro_batch_size=shapes.micro_batch, global_batch_size=shapes.micro_batch,
            seq_length=shapes.seq_length, train_iters=steps, lr=1e-5, lr_decay_style="constant",
            bf16=True, freeze_ViT=True, mock_data=True, images_per_sample=1,
        ),
    )
    resolved = resolve(run_config, world_size=1)
    state = ParallelState.single(device)
    state.seed(0)
    model = LlavaModel(resolved.model, state)
    model.initialize(0)
    return build_trainer(resolved, state, [model])


def make_batch(shapes: Shapes, config: LlavaConfig, seed: int) -> dict[str, torch.Tensor]:
    """One image per sample at the start, then random text; labels skip the image positions."""
    g = torch.Generator().manual_seed(seed)
    b, s = shapes.micro_batch, shapes.seq_length
    image_token = config.language.image_token_id
    input_ids = torch.randint(2, image_token, (b, s), generator=g)
    input_ids[:, 1 : 1 + config.image_tokens_per_image] = image_token
    labels = input_ids.masked_fill(input_ids == image_token, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    pixels = torch.randn(b, 3, shapes.image_size, shapes.image_size, generator=g)
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixels,
            "images_per_sample": torch.ones(b, dtype=torch.long)}


def parameter_counts(model: LlavaModel) -> tuple[int, int]:
    """(trainable, frozen) parameters; frozen is the vision tower."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def model_flops(shapes: Shapes, config: LlavaConfig, trainable: int, frozen: int) -> float:
    tokens = shapes.micro_batch * shapes.seq_length
    image_tokens = shapes.micro_batch * config.vision.seq_length
    attention_lm = 3 * 4 * shapes.micro_batch * shapes.seq_length**2 * shapes.lm_hidden * shapes.lm_layers
    used_vit_layers = config.vision.num_layers_used
    attention_vit = 4 * shapes.micro_batch * config.vision.seq_length**2 * shapes.vit_hidden * used_vit_layers
    return 6 * trainable * tokens + 2 * frozen * image_tokens + attention_lm + attention_vit


def peak_flops(device: str, override: float | None) -> float | None:
    if override is not None:
        return override * 1e12
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first (default 3)")
    parser.add_argument("--micro-batch", type=int, help="samples per step (default 4)")
    parser.add_argument("--seq-length", type=int, help="tokens per sample (default 2048)")
    parser.add_argument("--attention-backend", choices=["sdpa", "unfused"], default="sdpa")
    parser.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s for MFU (default: from the device)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (checks that the script runs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --tiny --device cpu to check the script", file=sys.stderr)
        return 2
    shapes = TINY if args.tiny else Shapes()
    if args.micro_batch:
        shapes = replace(shapes, micro_batch=args.micro_batch)
    if args.seq_length:
        shapes = replace(shapes, seq_length=args.seq_length)
    config = build_config(shapes, args.attention_backend)
    trainer = build_trainer_for(shapes, config, args.device, 2 * (args.warmup + args.steps) + 2)
    model = trainer.chunks[0]
    trainable, frozen = parameter_counts(model)
    total = trainable + frozen
    flops = model_flops(shapes, config, trainable, frozen)
    peak = peak_flops(args.device, args.peak_tflops)
    batch = make_batch(shapes, config, 0)
    tokens = shapes.micro_batch * shapes.seq_length
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {device_name}, torch {torch.__version__}, attention {args.attention_backend}")
    print(f"parameters: {total / 1e9:.3f}B ({trainable / 1e9:.3f}B trainable, vision tower frozen)")
    print(f"batch: {shapes.micro_batch} x {shapes.seq_length} tokens, {flops / 1e12:.1f} TFLOPs per step")

    def step(iteration: int) -> tuple[float, float]:
        """(seconds, loss) of one training step."""
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = train_step(trainer, [batch], iteration)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if not result.applied:
            raise RuntimeError(f"step {iteration}: non-finite gradients, update skipped")
        return time.perf_counter() - start, result.loss

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    losses: dict[str, float] = {}
    iteration = 0
    for mode in MODES:  # warm-up, incl. the kernels' just-in-time build and allocator growth
        with kernel_mode(mode):
            for _ in range(args.warmup):
                step(iteration)
                iteration += 1
    half = max(1, args.steps // 2)
    for block in range(2 * ((args.steps + half - 1) // half)):
        mode = MODES[block % 2]
        with kernel_mode(mode):
            for _ in range(half):
                if len(times[mode]) < args.steps:
                    seconds, losses[mode] = step(iteration)
                    times[mode].append(seconds)
                    iteration += 1

    print(f"\n{'kernels':<12}{'median step s':>14}{'min':>9}{'max':>9}{'tokens/s':>12}{'MFU':>8}{'last loss':>11}")
    medians = {}
    for mode in MODES:
        median = statistics.median(times[mode])
        medians[mode] = median
        mfu = f"{100 * flops / median / peak:.1f}%" if peak else "n/a"
        label = "on (all)" if mode == "all" else "off (ref)"
        print(f"{label:<12}{median:>14.4f}{min(times[mode]):>9.4f}{max(times[mode]):>9.4f}"
              f"{tokens / median:>12.0f}{mfu:>8}{losses[mode]:>11.4f}")
    print(f"\nspeedup with kernels: {medians['reference'] / medians['all']:.3f}x")
    if args.device != "cuda":
        print("(CPU: no kernel runs, both modes use the references; this checks the script only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
