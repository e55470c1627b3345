"""LoRA checkpoints: adapter-only saves, and the base model they sit on.

A LoRA run has two sources of weights:

- the base (`--pretrained-checkpoint`): any megamm checkpoint without adapters (a training save, a
  model-only save, a conversion of a Hugging Face model, a merged LoRA model), read at any layout.
  It fills every parameter that is not an adapter's; the run's own checkpoints never repeat it.
- the run's checkpoints (`--save`, `--load`): the trainable tensors only, i.e. the adapters and any
  part the freeze flags leave trainable (an untargeted projector), under the usual `model/<name>`
  keys, with their optimizer state, the progress and the generator states. The description says
  `"contents": "trainable"` and names the base (`"pretrained"`), which tools/merge_lora.py reads.

Both loads are ordinary block loads (megamm.checkpoint.blocks), so each works at any tp / pp / dp
layout, and go through the fit check: a base holding adapters, or an adapter checkpoint passed as
the base, is an error naming the tensors (and what to pass instead) before anything is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch import nn

from megamm.checkpoint import dcp_io, format
from megamm.checkpoint.blocks import BlockLoadPlanner, BlockTensor, gathered_shapes, model_blocks
from megamm.checkpoint.model_weights import resolve_checkpoint
from megamm.models.lora import is_adapter_parameter
from megamm.parallel.state import ParallelState


def trainable_blocks(blocks: Mapping[str, BlockTensor], chunks: Sequence[nn.Module]) -> dict[str, BlockTensor]:
    """The `model/` blocks of the parameters that train (what a LoRA run saves)."""
    trainable = {format.model_key(n) for chunk in chunks for n, p in chunk.named_parameters() if p.requires_grad}
    return {key: value for key, value in blocks.items() if key in trainable}


def adapter_description(pretrained: str | None) -> dict[str, object]:
    """The description fields of a LoRA run's checkpoint."""
    return {format.CONTENTS: format.TRAINABLE, format.PRETRAINED: pretrained}


def load_pretrained(chunks: Sequence[nn.Module], pretrained: str | Path, state: ParallelState, verify: bool = True,
                    log: Callable[[str], None] = print) -> Path:
    """Fill every parameter of `chunks` that is not an adapter's from the base checkpoint
    `pretrained`, at any layout. Collective over `state.checkpoint_group` (every rank calls it with
    its stage's chunks). Raises CheckpointMismatchError listing every difference before reading."""
    path = resolve_checkpoint(pretrained)
    description = format.read_description(path)
    request = {key: value for key, value in model_blocks(chunks, state).items()
               if not is_adapter_parameter(format.parameter_name(key))}
    hints = {format.MODEL: f"{path} is a LoRA run's checkpoint (trainable tensors only): pass it to --load, and "
                           f"its base ({description.get(format.PRETRAINED)}) to --pretrained-checkpoint"
             } if format.holds_trainable_only(description) else None
    source = dcp_io.reader(path, verify)
    fit = format.check_fit(path, gathered_shapes(request, state.checkpoint_group),
                           source.read_metadata().state_dict_metadata, fresh_allowed=(format.FRESH_PROJECTOR,),
                           missing_hints=hints)
    if format.FRESH_PROJECTOR in fit.fresh:
        log(f" {path} has no projector: the projector keeps its initialization from --seed")
    dcp_io.load({k: v for k, v in request.items() if k in fit.keys}, source, BlockLoadPlanner(),
                state.checkpoint_group)
    log(f" loaded the base model from {path}")
    return path
