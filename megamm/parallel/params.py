"""What megamm knows about each parameter, kept in an explicit table, and layout-independent init.

Every parameter a megamm module creates has one `ParamSpec`: its master layout (how the local
tensor is cut from the full tensor, and how that tensor is initialized), whether its gradient is
a sequence-parallel partial sum, and its role in tied word embeddings. The records are not
attributes of the `torch.nn.Parameter`: a module that creates parameters is a `ParamOwner` and
keeps the records of its own parameters; `param_specs(model)` collects the table of a whole
module tree, keyed like `model.named_parameters()`. Whoever needs the global view of a parameter
(init, gathering, sequence-parallel grad sums, tied-embedding sync, the grad norm, checkpoints,
converters) reads the table, so what it relies on is written in one type and checked when the
table is built.

`initialize_parameters` fills every parameter from a generator seeded by (seed, global parameter
name). That is what makes a tp=4 model identical to a tp=1 model, and what the parity tests lean on.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from megamm.parallel.mappings import Group, group_rank, group_size
from megamm.parallel.sharding import ParamLayout, parameter_seed, shard_master
from megamm.parallel.state import ParallelState


class TiedEmbedding(enum.Enum):
    """The role of a word-embedding table whose transpose is also the output layer's weight."""

    # The table the first stage looks tokens up in (with pp=1 also the output layer's weight).
    TABLE = "table"
    # A last stage's own copy of the table for its output layer (pipelining): initialized like the
    # table (same global name) and kept equal by syncing its gradient with the table's.
    OUTPUT_COPY = "output_copy"


@dataclass(frozen=True)
class ParamSpec:
    """The record of one parameter.

    layout: master shape, init, tensor-parallel partition dim, fused parts, vocabulary padding.
    sequence_partial_grad: under sequence parallelism the parameter is replicated over tp but
        applied to this rank's `s/tp` chunk of the sequence only (norms, row-parallel biases), so
        its local gradient is a partial sum that must be summed over tp before the optimizer.
    tied: the tied-embedding role, or None for every other parameter.
    tp_partial_grad: the parameter is replicated over tp next to a tp-split one in the same
        product (the replicated factor of a LoRA adapter, megamm.parallel.lora), so its local
        gradient is a partial sum over tp whether or not sequence parallelism is on; summed with
        the sequence-parallel partial grads.
    """

    layout: ParamLayout
    sequence_partial_grad: bool = False
    tied: TiedEmbedding | None = None
    tp_partial_grad: bool = False

    @property
    def partial_grad_over_tp(self) -> bool:
        """The local gradient must be summed over tp before the optimizer (either reason above)."""
        return self.sequence_partial_grad or self.tp_partial_grad

    @property
    def tp_replicated(self) -> bool:
        """Every tp rank holds the whole master tensor (no partition dim)."""
        return self.layout.partition_dim is None


class ParamOwner(nn.Module):
    """A module that creates parameters; it keeps the `ParamSpec` of each one it registers."""

    def __init__(self) -> None:
        super().__init__()
        self.own_param_specs: dict[str, ParamSpec] = {}

    def create_parameter(
        self, name: str, spec: ParamSpec, state: ParallelState, dtype: torch.dtype
    ) -> nn.Parameter:
        """Register an uninitialized local parameter `name` (`spec.layout.local_shape(tp)`) and its
        record. `initialize_parameters` fills it."""
        param = nn.Parameter(torch.empty(spec.layout.local_shape(state.tp_size), dtype=dtype, device=state.device))
        self.register_parameter(name, param)
        self.own_param_specs[name] = spec
        return param


def param_specs(model: nn.Module) -> dict[str, ParamSpec]:
    """The table of a module tree: {name as in `model.named_parameters()`: its ParamSpec}.

    Raises TypeError naming a parameter that was registered without a record (by a module that is
    not a ParamOwner, or with `register_parameter` instead of `create_parameter`).
    """
    table: dict[str, ParamSpec] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        own = module.own_param_specs if isinstance(module, ParamOwner) else {}
        for name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{name}" if module_name else name
            if id(param) in seen:
                continue
            seen.add(id(param))
            if name not in own:
                raise TypeError(
                    f"parameter {full_name} of {type(module).__name__} has no ParamSpec; create it with "
                    "ParamOwner.create_parameter"
                )
            table[full_name] = own[name]
    return table


def specs_by_parameter(modules: Iterable[nn.Module]) -> dict[nn.Parameter, ParamSpec]:
    """The tables of several module trees (one stage's model chunks) keyed by the parameter itself,
    for code that holds parameters rather than names (gradient buffers, optimizers)."""
    out: dict[nn.Parameter, ParamSpec] = {}
    for module in modules:
        params = dict(module.named_parameters())
        out.update((params[name], spec) for name, spec in param_specs(module).items())
    return out


@torch.no_grad()
def initialize_parameters(model: nn.Module, seed: int, tp_group: Group, prefix: str = "") -> None:
    """Fill every parameter of `model` from its master tensor, independent of the parallel layout.

    The master is built on the CPU in fp32 from `torch.Generator().manual_seed(parameter_seed(...))`
    so the values do not depend on device, tp size or dtype; the local shard is then cast and
    copied into place. `prefix` is prepended to the names (for a submodule of a larger model).
    """
    rank, size = group_rank(tp_group), group_size(tp_group)
    params = dict(model.named_parameters())
    for name, spec in param_specs(model).items():
        layout = spec.layout
        generator = torch.Generator().manual_seed(parameter_seed(seed, prefix + name))
        master = torch.empty(layout.master_shape, dtype=torch.float32)
        layout.init(master, generator)
        params[name].copy_(shard_master(master, layout, rank, size))
