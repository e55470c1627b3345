"""Regional compilation: each `TransformerLayer` compiled on its own with `torch.compile`.

Compiling layer by layer (as torchtitan does) rather than the whole model keeps compile time to one
graph per distinct input shape: every layer of a tower runs the same code on the same shapes, so
dynamo compiles the layer's forward once and the other layers reuse the graph (parameters are graph
inputs, not constants). Everything around the layers (embeddings, image scatter, the loss, the
pipeline schedule, the gradient hooks) stays eager, which is what lets the compiled layers work
under every parallel layout:

- `nn.Module.compile` compiles in place, so parameter names, `param_specs`, checkpoints and the
  gradient buffers see the same module tree as in eager mode.
- Tensor and sequence parallelism: the collectives of `megamm.parallel.mappings` are custom
  autograd Functions calling `torch.distributed`; dynamo traces them (the in-place collectives
  become functional collectives in the graph, backward included), so a tp>1 layer is still one
  graph (`fullgraph=True` on every layout).
- Full activation recompute checkpoints the compiled layer from outside (`torch.utils.checkpoint`
  re-runs the compiled forward during backward); selective recompute checkpoints the attention core
  inside the graph (`megamm.transformer.recompute`).
- Shapes: training shapes are fixed (`--seq-length`, `--micro-batch-size`), so layers compile with
  `dynamic=False` and each distinct shape gets its own graph (the vision tower's and the language
  model's sequences are two), except the batch dim of a block's input, which is marked dynamic: the
  vision tower's batch is the microbatch's image count, which changes from one microbatch to the next
  (text-only samples), and one graph serves every count of 2 or more (dynamo specializes a size of 1;
  that count gets a graph of its own). Evaluation (no_grad) adds its own graphs. All the variants
  are entries of the one `TransformerLayer.forward`, so the recompile limit per code object is raised
  to `RECOMPILE_LIMIT` (torch's default of 8 counts every tower, shape and grad mode together).
- LoRA / DoRA adapters (megamm.parallel.lora) run inside their parallel linear, so inside the
  layer's graph: the adapter's matmuls, and DoRA's detached row norms with their all-reduce over tp
  (a row-parallel layer), trace like the rest of the layer (`fullgraph=True` holds).
- Dropout is refused with `--torch-compile` (`megamm.config.run`), the layers' and LoRA's alike: it
  draws from the RNG tracker's forked streams, which do not trace, and inductor would draw
  different random numbers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch._dynamo
from torch import nn

from megamm.transformer.layer import TransformerBlock, TransformerLayer

RECOMPILE_LIMIT = 64


def _dynamic_batch(block: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook of a block (eager, outside the compiled layers): its input `[s, b, h]` may
    change `b` without a recompilation."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3:
        torch._dynamo.maybe_mark_dynamic(args[0], 1)


def compile_layers(model: nn.Module) -> int:
    """Compile every `TransformerLayer` inside `model` in place; returns how many.

    Compilation itself happens lazily, at a layer's first call with a new input shape (the first
    training step); the caller times that step separately.
    """
    layers = [module for module in model.modules() if isinstance(module, TransformerLayer)]
    for layer in layers:
        layer.compile(fullgraph=True, dynamic=False)
    for block in model.modules():
        if isinstance(block, TransformerBlock):
            block.register_forward_pre_hook(_dynamic_batch)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return len(layers)
