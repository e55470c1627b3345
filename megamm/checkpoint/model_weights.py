"""Load the model weights of any megamm checkpoint into a model, at any tensor-parallel size.

Generation, evaluation and converters need the weights only: no trainer, optimizer, progress or
generator states. A checkpoint stores every parameter under `model/<global name>` in its master
shape (see `megamm.checkpoint.blocks`), so a model of any layout asks DCP for the blocks it holds,
exactly as a training resume does, and DCP reads the overlapping slices of whatever was saved.

Without `torch.distributed` (one process) the load is local. In a torchrun job DCP plans the
reads collectively over the default group, so every process of the job calls this together (as
every rank builds and loads its model at start-up); DCP's per-process `no_dist` mode would avoid
that, but it is missing from the torch releases before 2.7 that megamm supports. Tensor data is
read with `weights_only` semantics, the metadata through the allow-list unpickler of
`SafeFileSystemReader`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megamm.checkpoint import storage
from megamm.checkpoint.blocks import BlockLoadPlanner, BlockTensor, parameter_blocks
from megamm.parallel.params import param_specs
from megamm.parallel.state import ParallelState

MODEL_PREFIX = "model/"


class ModelWeightsError(RuntimeError):
    """The checkpoint's model weights do not fit the model; the message lists every difference."""


def resolve_checkpoint(load: str | Path) -> Path:
    """The checkpoint directory `load` names (itself, or its `latest`); FileNotFoundError otherwise."""
    path = storage.resolve(load)
    if path is None:
        raise FileNotFoundError(f"no megamm checkpoint in {load} (neither {storage.DESCRIPTION} nor {storage.LATEST})")
    return path


def read_run_config_tree(load: str | Path) -> tuple[Path, dict]:
    """(checkpoint directory, the run config tree saved in its description)."""
    path = resolve_checkpoint(load)
    tree = storage.read_description(path).get("config")
    if not isinstance(tree, dict):
        raise TypeError(f"{path / storage.DESCRIPTION} holds no run config")
    return path, tree


def _requests(modules: Iterable[nn.Module], state: ParallelState) -> dict[str, BlockTensor]:
    request: dict[str, BlockTensor] = {}
    for module in modules:
        specs = param_specs(module)
        for name, param in module.named_parameters():
            request[MODEL_PREFIX + name] = parameter_blocks(param.data, specs[name].layout, state.tp_rank, state.tp_size)
    return request


def _problems(request: dict[str, BlockTensor], saved: dict) -> list[str]:
    problems = []
    missing = sorted(key for key in request if key not in saved)
    if missing:
        problems.append("missing in the checkpoint: " + ", ".join(missing))
    unexpected = sorted(key for key in saved if key.startswith(MODEL_PREFIX) and key not in request)
    if unexpected:
        problems.append("in the checkpoint but not in the model: " + ", ".join(unexpected))
    for key, blocks in sorted(request.items()):
        info = saved.get(key)
        if isinstance(info, TensorStorageMetadata) and tuple(info.size) != tuple(blocks.shape):
            problems.append(f"{key}: checkpoint has shape {list(info.size)}, the model needs {list(blocks.shape)}")
    return problems


@torch.no_grad()
def load_model_weights(modules: nn.Module | Iterable[nn.Module], load: str | Path, state: ParallelState) -> Path:
    """Fill every parameter of `modules` (model chunks held by this process) from checkpoint `load`.

    `load` is a checkpoint directory or a save directory with `latest`. Padding rows of the
    vocabulary (never saved) are zeroed. The modules must hold the whole model (every `model/` key
    of the checkpoint, no more, no fewer). Raises ModelWeightsError listing every missing,
    unexpected or differently shaped tensor before anything is read (every process finds the same
    problems, as all hold the same parameter names). Collective under torch.distributed (see the
    module docstring). Returns the checkpoint directory.
    """
    path = resolve_checkpoint(load)
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    reader = storage.SafeFileSystemReader(path)
    saved = reader.read_metadata().state_dict_metadata
    request = _requests(modules, state)
    problems = _problems(request, saved)
    if problems:
        raise ModelWeightsError(f"checkpoint {path} does not fit this model:\n  - " + "\n  - ".join(problems))
    for module in modules:
        for param in module.parameters():
            param.zero_()
    with warnings.catch_warnings():
        # One process without torch.distributed is a supported use; DCP warns about it all the same.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(request, storage_reader=reader, planner=BlockLoadPlanner())
    return path
