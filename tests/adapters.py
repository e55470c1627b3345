"""LoRA test helpers shared by the parity, conversion and checkpoint tests."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from megamm.parallel.params import param_specs
from megamm.parallel.sharding import parameter_seed, shard_master
from megamm.parallel.state import ParallelState


@torch.no_grad()
def perturb_adapters(chunks: Iterable[nn.Module], state: ParallelState, seed: int = 11) -> None:
    """Every adapter's B (and DoRA's magnitude) away from its init, layout-independently: each is
    drawn whole per global name and sharded, so every layout gets the same adapters. With B at its
    zero init, A would get no gradient and the adapters would change nothing."""
    for chunk in chunks:
        specs = param_specs(chunk)
        for name, param in chunk.named_parameters():
            if name.endswith(("lora_b", "magnitude")):
                layout = specs[name].layout
                generator = torch.Generator().manual_seed(parameter_seed(seed, name))
                master = torch.randn(layout.master_shape, generator=generator)
                master = 0.05 * master if name.endswith("lora_b") else param.new_ones(()) + 0.1 * master
                param.copy_(shard_master(master, layout, state.tp_rank, state.tp_size))
