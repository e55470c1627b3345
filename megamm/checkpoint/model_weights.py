"""Load the model weights of any megamm checkpoint into a model, at any tensor-parallel size.

Generation, evaluation and converters need the weights only: no optimizer, progress or generator
states. A checkpoint stores every parameter under `model/<global name>` in its master shape (see
`megamm.checkpoint.blocks`), so a model of any layout asks DCP for the blocks it holds, exactly as
a training resume does, and DCP reads the overlapping slices of whatever was saved: a full
training checkpoint, a model-only one (`Checkpointer.save_model`, `reshard_checkpoint.py
--no-optim`) or a converted one.

DCP plans the reads over the state's `checkpoint_group`: every process of that group calls this
together (as every rank builds and loads its model at start-up). A state without groups reads
within this process, also inside a larger torchrun job. Tensor data is read with `weights_only`
semantics, the metadata through the allow-list unpickler of `SafeFileSystemReader`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from megamm.checkpoint import dcp_io, format
from megamm.checkpoint.blocks import BlockLoadPlanner, model_blocks
from megamm.parallel.state import ParallelState


def resolve_checkpoint(load: str | Path) -> Path:
    """The checkpoint directory `load` names (itself, or its `latest`); FileNotFoundError otherwise."""
    path = format.resolve(load)
    if path is None:
        raise FileNotFoundError(f"no megamm checkpoint in {load} "
                                f"(neither {format.DESCRIPTION} nor {format.LATEST})")
    return path


def read_run_config_tree(load: str | Path) -> tuple[Path, dict]:
    """(checkpoint directory, the run config tree saved in its description)."""
    path = resolve_checkpoint(load)
    tree = format.read_description(path).get("config")
    if not isinstance(tree, dict):
        raise format.CheckpointFormatError(f"{path / format.DESCRIPTION} holds no run config")
    return path, tree


@torch.no_grad()
def load_model_weights(modules: nn.Module | Iterable[nn.Module], load: str | Path, state: ParallelState,
                       verify: bool = True) -> Path:
    """Fill every parameter of `modules` (model chunks held by this process) from checkpoint `load`.

    `load` is a checkpoint directory or a save directory with `latest`. Padding rows of the
    vocabulary (never saved) are zeroed. The modules must hold the whole model (every `model/` key
    of the checkpoint, no more, no fewer). Raises CheckpointMismatchError listing every missing,
    unexpected or differently shaped tensor before anything is read (every process finds the same
    problems, as all hold the same parameter names). Collective over `state.checkpoint_group` (see
    the module docstring). With `verify`, the files read are checked against the checksums of
    the checkpoint's description first (megamm.checkpoint.dcp_io). Returns the checkpoint directory.
    """
    path = resolve_checkpoint(load)
    if format.holds_trainable_only(format.read_description(path)):
        raise format.CheckpointFormatError(
            f"{path} is a LoRA run's checkpoint (its trainable tensors only): merge it into its base first "
            "(tools/merge_lora.py merge), then load the merged checkpoint")
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    request = model_blocks(modules, state)
    wanted = {key: tuple(value.shape) for key, value in request.items()}
    source = dcp_io.reader(path, verify)
    format.check_fit(path, wanted, source.read_metadata().state_dict_metadata)
    for module in modules:
        for param in module.parameters():
            param.zero_()
    dcp_io.load(request, source, BlockLoadPlanner(), state.checkpoint_group)
    return path
