"""Put LoRA / DoRA adapters on a model's parallel linears by target name, merge them, reset DoRA.

The adapter layers are megamm.parallel.lora's; this module decides which layers get one. It looks
at every `ColumnParallelLinear` / `RowParallelLinear` of the model, whatever family built it, and
matches its name against the targets (megamm.config.lora):

- decoder layers (`language.decoder.layers.<i>.<path>`): `<path>` and the fused part from
  `LANGUAGE_TARGETS` (q_proj -> part 0 of `self_attention.qkv`, ...);
- `projector` / `vision`: every linear below that part's submodules (megamm.config.lora.PART_TARGETS:
  the projector, or a native tower's patch merger; the vision tower's layers), all parts of a fused
  one.

A fused layer gets one adapter per targeted part where its Hugging Face form is separate modules
(q/k/v_proj, gate/up_proj), and one adapter of the whole layer where that form is one module (the
Qwen2-VL tower's `attn.qkv`), so that a PEFT adapter of the Hugging Face model maps onto megamm's
one to one. The family key maps (the entries of megamm.models.towers / decoders) say which.

The output layer (and a tied one, which has no weight of its own) never gets an adapter, nor do the
vision layers after `select_layer`, which never run (megamm.config.model.VisionConfig.num_layers_used). Which
parameters train is the config's business (megamm.config.run.training_model_config freezes a part
that holds a target); adapters always train.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from megamm.config.lora import LANGUAGE_TARGETS, PART_TARGETS, LoraConfig
from megamm.models.decoders import decoder_family
from megamm.models.towers import tower_family
from megamm.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megamm.parallel.lora import LowRankAdapter

if TYPE_CHECKING:
    from megamm.config import LlavaConfig
    from megamm.models.llava import LlavaModel

DECODER_LAYERS = "language.decoder.layers."
VISION_LAYERS = "vision.encoder.layers."
ADAPTER = "adapter"


def targeted_parts(name: str, parts: int, targets: Iterable[str]) -> tuple[int, ...]:
    """The fused parts of linear `name` (with `parts` parts) that `targets` select (empty: none)."""
    selected: set[int] = set()
    for target in targets:
        if target in PART_TARGETS and name.startswith(tuple(f"{prefix}." for prefix in PART_TARGETS[target])):
            selected.update(range(parts))
        elif target in LANGUAGE_TARGETS and name.startswith(DECODER_LAYERS):
            path, part = LANGUAGE_TARGETS[target]
            if name.split(".", 4)[-1] == path:
                # A part of a fused layer, or the whole layer when it is not fused (a plain fc1).
                selected.add(part if part is not None and parts > 1 else 0)
    return tuple(sorted(selected))


def parallel_linears(model: nn.Module) -> Iterator[tuple[str, ColumnParallelLinear | RowParallelLinear]]:
    """(name, layer) of every tensor-parallel linear that has a weight of its own."""
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and module.weight is not None:
            yield name, module


def _runs(name: str, vision_layers_used: int) -> bool:
    """Whether linear `name` runs: not in a vision layer past the selected hidden state."""
    if not name.startswith(VISION_LAYERS):
        return True
    return int(name[len(VISION_LAYERS):].split(".", 1)[0]) < vision_layers_used


def hf_modules_per_layer(config: LlavaConfig) -> dict[str, int]:
    """{linear layer name: how many Hugging Face modules its weight is made of} for the vision tower
    and the decoder (the families' key maps); 1 for a fused megamm layer means one HF module."""
    entries = (tower_family(config.vision.family).entries(config.vision)
               + decoder_family(config.language.family).entries(config.language))
    return {e.megamm.removesuffix(".weight"): len(e.parts) for e in entries if e.megamm.endswith(".weight")}


def apply_lora(model: LlavaModel, lora: LoraConfig) -> list[str]:
    """Give every targeted linear of `model` (a LlavaModel or one pipeline chunk of it) an adapter
    in the weight's dtype; returns the adapted layers' names (a chunk may hold none). The adapters
    are uninitialized, like any new parameter: `initialize_parameters` fills them (A random, B 0)."""
    adapted = []
    vision_layers_used = model.config.vision.num_layers_used
    hf_modules = hf_modules_per_layer(model.config)
    for name, layer in parallel_linears(model):
        if not _runs(name, vision_layers_used):
            continue
        layout = layer.own_param_specs["weight"].layout
        if layout.padded_size is not None:
            continue  # the output layer: vocabulary rows, never a target
        out_features, in_features = layout.master_shape
        out_parts = layout.fused_parts or (out_features,)
        targeted = targeted_parts(name, len(out_parts), lora.targets)
        if not targeted:
            continue
        # A fused layer that is one module in its Hugging Face form (every part targeted, as
        # whole-part targets do) gets one adapter of the whole layer.
        shared = len(out_parts) > 1 and hf_modules.get(name) == 1
        layer.adapter = LowRankAdapter(
            in_features, out_parts, targeted, row_parallel=isinstance(layer, RowParallelLinear), lora=lora,
            state=layer.state, dtype=layer.weight.dtype, shared=shared,
        )
        adapted.append(name)
    return adapted


def adapters(modules: Iterable[nn.Module]) -> Iterator[tuple[str, ColumnParallelLinear | RowParallelLinear]]:
    """(layer name, layer) of every layer of `modules` that holds an adapter."""
    for module in modules:
        for name, layer in parallel_linears(module):
            if layer.adapter is not None:
                yield name, layer


def is_adapter_parameter(name: str) -> bool:
    """Whether parameter `name` (as in named_parameters) belongs to an adapter."""
    return f".{ADAPTER}." in f".{name}"


def reset_magnitudes(modules: Iterable[nn.Module]) -> None:
    """DoRA: every adapter's magnitude from its layer's current weight (after the base is loaded)."""
    for _, layer in adapters(modules):
        layer.adapter.reset_magnitude(layer.weight)


@torch.no_grad()
def merge_lora(modules: Iterable[nn.Module]) -> list[str]:
    """Fold every adapter into its layer's weight and remove it; returns the merged layers' names.
    The modules are then plain megamm models (same parameter names as without LoRA)."""
    merged = []
    for name, layer in list(adapters(modules)):
        layer.weight.copy_(layer.adapter.merged_weight(layer.weight))
        layer.adapter = None
        merged.append(name)
    return merged
