"""Gradient fix-ups that tensor/sequence parallelism needs before an optimizer step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megamm.parallel.mappings import Group, group_size


def allreduce_sequence_parallel_grads(grads: Sequence[torch.Tensor], tp_group: Group) -> None:
    """Sum over tp, in place, the grads of parameters applied to sequence chunks (norms, row biases).

    Under sequence parallelism such a parameter is replicated, but each tp rank only saw its
    `s/tp` slice of the sequence, so its local grad is a partial sum. The caller picks the grads
    from the parameter records (`ParamSpec.partial_grad_over_tp`, which also covers the replicated
    factors of LoRA adapters, partial for the same reason): `.grad`, or the main grads of
    the fp32 gradient buffers. One flat all-reduce over all of them (they are small) makes every
    replica's grad complete and identical; every tp rank must pass the same tensors in the same
    order.
    """
    if group_size(tp_group) == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=tp_group)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
