"""Optimizer state and trainable parameters per rank: LoRA against full fine-tuning, side by side.

    python bench/bench_lora_optimizer.py [--lm-hidden 1024 --lm-layers 8 --vocab 32000 --bf16] [--family qwen2_vl]

What is measured: the real trainer (`megamm.training.step.build_trainer`, the plain AdamW with fp32
masters) of one process (tp = pp = dp = 1), after one real training step on synthetic data, so that
the Adam moments exist; `MixedPrecisionOptimizer.state_bytes()` counts the fp32 master copies (bf16
parameters) and both moments. Every configuration is a stage 2 (`--freeze-ViT`), on the same
model: a LLaVA (ViT, mlp2x_gelu projector, LLaMA-style decoder), or with `--family qwen2_vl` a
Qwen2-VL of the same widths (native-resolution tower, its patch merger as the projector, a Qwen2
decoder with M-RoPE):

- full: the projector (merger) and the whole language model train;
- LoRA r on every decoder linear (q, k, v, o, gate, up, down): the adapters and the untargeted
  projector train;
- LoRA r on q, v only.

Per rank under tensor parallelism: a LoRA adapter's replicated factor (A of a column-parallel layer,
B of a row-parallel one, r x width) is held whole by every tp rank while the base and the split
factor are divided by tp, so the ratio of LoRA to full state grows by at most about tp for the
adapters' share; the distributed optimizer divides both by dp alike.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from megamm.config import LanguageConfig, LlavaConfig, ProjectorConfig, TransformerConfig, VisionConfig
from megamm.config.model import NativeResolutionConfig
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.data.loader import ResumePoint
from megamm.parallel.state import ParallelState
from megamm.pipeline.chunks import build_model_chunks
from megamm.training.data import SyntheticData
from megamm.training.step import build_trainer, train_step


def model_config(args: argparse.Namespace) -> LlavaConfig:
    native = args.family == "qwen2_vl"
    tower = TransformerConfig(
        hidden_size=args.vit_hidden, num_layers=args.vit_layers, num_attention_heads=8, ffn_hidden_size=4 * args.vit_hidden,
        normalization="layernorm", activation="quick_gelu", add_bias_linear=True,
        position_embedding="rope" if native else "learned", causal=False)
    text = TransformerConfig(
        hidden_size=args.lm_hidden, num_layers=args.lm_layers, num_attention_heads=16, num_query_groups=8,
        ffn_hidden_size=int(2.6875 * args.lm_hidden), add_qkv_bias=native)
    if not native:
        vision = VisionConfig(tower, image_size=64, patch_size=16)
        language = LanguageConfig(text, vocab_size=args.vocab, image_token_id=args.vocab - 1)
        return LlavaConfig(vision=vision, language=language, projector=ProjectorConfig())
    vision = VisionConfig(tower, family="qwen2_vl", patch_size=14,
                          native_resolution=NativeResolutionConfig(out_hidden_size=args.lm_hidden))
    language = LanguageConfig(text, family="qwen2", vocab_size=args.vocab, image_token_id=args.vocab - 2,
                              video_token_id=args.vocab - 1, mrope_section=(8, 12, 12))
    return LlavaConfig(vision=vision, language=language, projector=None)


def measure(model: LlavaConfig, args: argparse.Namespace, **lora) -> dict:
    training = TrainingConfig(mock_data=True, micro_batch_size=1, global_batch_size=1, seq_length=64,
                              train_iters=1, bf16=args.bf16, freeze_ViT=True, images_per_sample=1, **lora)
    config = resolve(RunConfig(model=model, training=training), 1)
    state = ParallelState.single()
    state.seed(training.seed)
    chunks = build_model_chunks(config, state)
    trainer = build_trainer(config, state, chunks)
    data = SyntheticData(config, state, ResumePoint())
    started = time.perf_counter()
    train_step(trainer, data.microbatches(0), 0)
    return {
        "parameters": sum(p.numel() for p in trainer.parameters()),
        "trainable": sum(p.numel() for p in trainer.parameters() if p.requires_grad),
        "state_bytes": trainer.optimizer.state_bytes(),
        "step_seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vit-hidden", type=int, default=512)
    parser.add_argument("--vit-layers", type=int, default=6)
    parser.add_argument("--lm-hidden", type=int, default=1024)
    parser.add_argument("--lm-layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--bf16", action="store_true", help="bf16 parameters (the optimizer keeps fp32 masters)")
    parser.add_argument("--family", choices=("llava", "qwen2_vl"), default="llava",
                        help="the model: LLaVA, or Qwen2-VL (native-resolution tower, merger, M-RoPE decoder)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = model_config(args)
    cases = {
        "full fine-tuning": {},
        f"LoRA r={args.rank}, every decoder linear": {"lora_rank": args.rank},
        f"LoRA r={args.rank}, q_proj,v_proj": {"lora_rank": args.rank, "lora_target_modules": ["q_proj,v_proj"]},
    }
    results = {name: measure(replace(model), args, **lora) for name, lora in cases.items()}
    full = results["full fine-tuning"]
    print(f"model: {args.family}, {full['parameters']:,} parameters ({'bf16' if args.bf16 else 'fp32'}), one process, "
          f"stage 2 (--freeze-ViT); torch {torch.__version__}")
    print(f"{'configuration':<40} {'trainable':>14} {'optimizer bytes':>16} {'vs full':>8} {'step s':>7}")
    for name, r in results.items():
        print(f"{name:<40} {r['trainable']:>14,} {r['state_bytes']:>16,} "
              f"{r['state_bytes'] / full['state_bytes']:>8.3f} {r['step_seconds']:>7.2f}")


if __name__ == "__main__":
    main()
