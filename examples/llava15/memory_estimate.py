"""Per-GPU memory estimate of a megamm run config, without building the model.

    python examples/llava15/memory_estimate.py examples/llava15/stage1_pretrain.yaml \
        examples/llava15/stage2_finetune.yaml --world-size 16

(the files merge as repeated --config flags do: stage 2 has no model section of its own, it trains
the model of stage 1's checkpoint, which is stage 1's model.)

Parameter counts come from a LlavaModel built on the meta device (shapes only, no memory); each
parameter is assigned to its pipeline stage and divided by tp when it is tensor-parallel. Per
stage, in bytes:

- weights: 2 per parameter (bf16/fp16) or 4 (fp32);
- trainable parameters: 4 for the fp32 main grad, and 12 for the fp32 master weight and the two
  Adam moments, divided by dp x cp with the distributed optimizer;
- activations kept for backward, per decoder layer and microbatch (Megatron's estimate with
  sequence parallelism and a fused attention kernel, which stores no s x s scores): 34 s b h / tp
  without recompute, 2 s b h / tp with full recompute; 1F1B keeps up to pp - stage microbatches in
  flight. Frozen towers that run under no_grad (the vision tower) keep none. With context
  parallelism s is a rank's share, seq_length / cp.
- the last stage's logits: 6 bytes per element of `[s, b, V/tp]` (bf16 logits, fp32 for the loss).

It leaves out the CUDA context, allocator fragmentation and communication buffers (a few GiB):
compare the total with the device memory minus a margin.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from megamm.config.layout import stage_layers
from megamm.config.resolved import ResolvedConfig
from megamm.models.llava import LlavaModel
from megamm.parallel.params import param_specs
from megamm.parallel.state import ParallelState
from megamm.train import read_config

GIB = 2**30
_LAYER = re.compile(r"^language\.decoder\.layers\.(\d+)\.")


def _stage_of(name: str, layer_stage: dict[int, int], pp: int) -> int:
    match = _LAYER.match(name)
    if match:
        return layer_stage[int(match.group(1))]
    if name.startswith(("language.final_norm", "language.output_layer")):
        return pp - 1
    return 0  # vision tower, projector, embedding


def estimate(config: ResolvedConfig) -> dict:
    """{"stages": [per-stage GiB breakdown], "peak_gib": the largest stage total, "parameters": count}."""
    p, t = config.parallel, config.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = config.data_parallel_size
    model_config = config.model
    model = LlavaModel(model_config, ParallelState.single("meta"))
    layers = model_config.language.transformer.num_layers
    layer_stage = {n: r for r in range(pp) for chunk in stage_layers(
        layers, pp, r, p.num_layers_per_virtual_pipeline_stage, p.decoder_first_pipeline_num_layers,
        p.decoder_last_pipeline_num_layers) for n in chunk}
    weight_bytes = torch.finfo(config.params_dtype).bits // 8
    optimizer_share = dp * p.context_parallel_size if t.use_distributed_optimizer else 1
    stages = [{"weights": 0.0, "grads": 0.0, "optimizer": 0.0, "activations": 0.0, "logits": 0.0} for _ in range(pp)]
    total_parameters = 0
    specs = param_specs(model)
    for name, param in model.named_parameters():
        numel = param.numel()
        total_parameters += numel
        local = numel if specs[name].tp_replicated else numel // tp
        stage = stages[_stage_of(name, layer_stage, pp)]
        stage["weights"] += local * weight_bytes
        if param.requires_grad:
            stage["grads"] += local * 4
            stage["optimizer"] += local * 12 / optimizer_share
    s, b = t.seq_length // p.context_parallel_size, t.micro_batch_size
    h = model_config.language.transformer.hidden_size
    per_layer = (2 if t.recompute_granularity == "full" else 34) * s * b * h / tp
    microbatches = config.microbatches_per_step
    for rank in range(pp):
        held = sum(1 for stage in layer_stage.values() if stage == rank)
        in_flight = min(pp - rank, microbatches) if pp > 1 else 1
        stages[rank]["activations"] = per_layer * held * in_flight
    stages[-1]["logits"] = 6 * s * b * model.language.padded_vocab_size / tp
    out = []
    for stage in stages:
        gib = {k: v / GIB for k, v in stage.items()}
        gib["total"] = sum(gib.values())
        out.append(gib)
    return {"stages": out, "peak_gib": max(s["total"] for s in out), "parameters": total_parameters}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Per-GPU memory estimate of a megamm run config.")
    parser.add_argument("config", type=Path, nargs="+", help="YAML file(s), merged as repeated --config")
    parser.add_argument("--world-size", type=int, required=True)
    args = parser.parse_args(argv)
    flags = [part for path in args.config for part in ("--config", str(path))]
    result = estimate(read_config(flags, args.world_size))
    print(f"{result['parameters'] / 1e9:.2f} B parameters")
    for rank, stage in enumerate(result["stages"]):
        print(f"stage {rank}: " + ", ".join(f"{k} {v:.1f} GiB" for k, v in stage.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
