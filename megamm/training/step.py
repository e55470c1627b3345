"""One optimizer step over a global batch, and evaluation.

The step is: zero the main grads -> count the global batch's loss tokens -> the forward-backward
schedule over this rank's microbatches -> finish the dp gradient sync -> sum sequence-parallel
partial grads over tp -> optimizer step (unscale, norm, skip or clip, AdamW). The schedule is a
plain function argument: the no-pipelining one here is gradient accumulation; a pipeline schedule
with the same signature plugs in without touching the rest.

Loss normalization: each microbatch backpropagates `sum(per-token loss) / T`, where T is the number
of loss tokens in the whole global batch (all microbatches, all dp ranks; one small all-reduce before
the first forward). Gradients are then SUM-reduced over dp, so the result is the per-token mean over
the global batch exactly, whatever dp and accumulation are.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megamm.models.language import shift_labels
from megamm.models.llava import LlavaModel
from megamm.optim.grad_buffer import GradBuffer
from megamm.optim.optimizer import DistributedOptimizer, MixedPrecisionOptimizer, ParamGroupSpec
from megamm.optim.schedules import DynamicLossScaler, LRSchedule
from megamm.parallel.cross_entropy import IGNORE_INDEX
from megamm.parallel.grads import allreduce_sequence_parallel_grads
from megamm.parallel.state import ParallelState
from megamm.training.arguments import RunConfig

Batch = dict[str, torch.Tensor | None]
ForwardBackward = Callable[..., torch.Tensor]


@dataclass
class StepResult:
    loss: float  # per-token mean over the global batch (same number on every rank)
    grad_norm: float
    applied: bool  # False when the gradients were not finite and the update was skipped
    loss_tokens: int  # tokens with a loss in the global batch
    lr: float


@dataclass
class Trainer:
    """What a step needs: the model, its gradient buffer, optimizer, schedules and settings."""

    config: RunConfig
    state: ParallelState
    model: LlavaModel
    buffer: GradBuffer
    optimizer: MixedPrecisionOptimizer | DistributedOptimizer
    lr_schedule: LRSchedule
    scaler: DynamicLossScaler | None
    forward_backward: ForwardBackward


def param_group_specs(model: LlavaModel, weight_decay: float, lr: float, projector_lr: float | None) -> dict:
    """Weight decay except on biases and norms (1-D tensors); the projector's own learning rate."""
    specs = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = weight_decay if param.dim() > 1 else 0.0
        scale = projector_lr / lr if projector_lr is not None and name.startswith("projector.") and lr > 0 else 1.0
        specs[param] = ParamGroupSpec(decay, scale)
    return specs


def build_trainer(config: RunConfig, state: ParallelState, model: LlavaModel) -> Trainer:
    t = config.training
    params = [p for p in model.parameters() if p.requires_grad]
    buffer = GradBuffer(
        params,
        state.dp_group,
        bucket_size=t.ddp_bucket_size,
        overlap=t.overlap_grad_reduce,
        shard_for_optimizer=t.use_distributed_optimizer,
    )
    optimizer_cls = DistributedOptimizer if t.use_distributed_optimizer else MixedPrecisionOptimizer
    optimizer = optimizer_cls(
        buffer,
        param_group_specs(model, t.weight_decay, t.lr, t.projector_lr),
        state,
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
    )
    schedule = LRSchedule(
        lr=t.lr,
        min_lr=t.min_lr,
        warmup_iters=t.lr_warmup_iters,
        decay_iters=t.lr_decay_iters if t.lr_decay_iters is not None else t.train_iters,
        style=t.lr_decay_style,
    )
    scaler = DynamicLossScaler(t.initial_loss_scale, t.loss_scale_window) if t.fp16 else None
    return Trainer(config, state, model, buffer, optimizer, schedule, scaler, forward_backward_no_pipelining)


def count_loss_tokens(microbatches: list[Batch]) -> int:
    return sum(int((shift_labels(mb["labels"]) != IGNORE_INDEX).sum()) for mb in microbatches)


def _sum_over(value: float, group, device: torch.device) -> float:
    tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, group=group)
    return tensor.item()


def forward_backward_no_pipelining(
    model: LlavaModel,
    microbatches: list[Batch],
    total_tokens: float,
    buffer: GradBuffer | None,
    loss_scale: float = 1.0,
    forward_only: bool = False,
) -> torch.Tensor:
    """Gradient accumulation: forward and backward each microbatch in turn.

    Returns the sum of per-token losses over this rank's microbatches (fp32, detached). With a
    buffer, its overlapped dp sync is armed for the last microbatch only.
    """
    total = torch.zeros((), dtype=torch.float32, device=model.state.device)
    for index, microbatch in enumerate(microbatches):
        if buffer is not None:
            buffer.is_last_microbatch = index == len(microbatches) - 1
        with torch.no_grad() if forward_only else nullcontext():
            output = model(**microbatch)
            loss_sum = output["loss"].sum()
        if not forward_only:
            (loss_sum * (loss_scale / total_tokens)).backward()
        total += loss_sum.detach()
    return total


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(trainer: Trainer, microbatches: list[Batch], iteration: int) -> StepResult:
    state, t = trainer.state, trainer.config.training
    microbatches = [_to_device(mb, state.device) for mb in microbatches]
    trainer.model.train()
    trainer.buffer.start_step()
    lr = trainer.lr_schedule(iteration)
    trainer.optimizer.set_lr(lr)
    total_tokens = _sum_over(count_loss_tokens(microbatches), state.dp_group, state.device)
    scale = trainer.scaler.scale if trainer.scaler is not None else 1.0
    loss_sum = trainer.forward_backward(
        trainer.model, microbatches, max(total_tokens, 1.0), trainer.buffer, loss_scale=scale
    )
    trainer.buffer.finish_grad_sync()
    allreduce_sequence_parallel_grads(trainer.model, state.tp_group, attribute="main_grad")
    applied, grad_norm = trainer.optimizer.step(t.clip_grad, grad_scale=scale)
    if trainer.scaler is not None:
        trainer.scaler.update(overflow=not applied)
    loss = _sum_over(loss_sum.item(), state.dp_group, state.device) / max(total_tokens, 1.0)
    return StepResult(loss, grad_norm, applied, int(total_tokens), lr)


def evaluate(trainer: Trainer, global_batches: list[list[Batch]]) -> float:
    """Per-token mean loss over the given global batches (this rank's microbatches of each)."""
    state = trainer.state
    trainer.model.eval()
    loss_sum, tokens = 0.0, 0.0
    for microbatches in global_batches:
        microbatches = [_to_device(mb, state.device) for mb in microbatches]
        tokens += count_loss_tokens(microbatches)
        loss_sum += trainer.forward_backward(trainer.model, microbatches, 1.0, None, forward_only=True).item()
    trainer.model.train()
    loss_sum = _sum_over(loss_sum, state.dp_group, state.device)
    tokens = _sum_over(tokens, state.dp_group, state.device)
    return loss_sum / max(tokens, 1.0)
