"""Gradient fix-ups that tensor/sequence parallelism needs before an optimizer step."""

from __future__ import annotations

import torch
from torch import nn

from megamm.parallel.mappings import Group, group_size


def allreduce_sequence_parallel_grads(model: nn.Module, tp_group: Group, attribute: str = "grad") -> None:
    """Sum over tp the grads of parameters applied to sequence chunks (norms, row biases).

    Under sequence parallelism such a parameter is replicated, but each tp rank only saw its
    `s/tp` slice of the sequence, so its local grad is a partial sum. One flat all-reduce over all
    of them (they are small) makes every replica's grad complete and identical. `attribute` names
    the gradient to fix: `grad`, or `main_grad` when the fp32 gradient buffers are in use.
    """
    if group_size(tp_group) == 1:
        return
    grads = [
        getattr(p, attribute)
        for p in model.parameters()
        if getattr(p, attribute, None) is not None
        and getattr(p, "param_layout", None) is not None
        and p.param_layout.sequence_parallel
    ]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=tp_group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
