"""One optimizer step over a global batch, and evaluation.

The step is: zero the main grads -> count the global batch's loss tokens -> the forward-backward
schedule over this rank's microbatches -> finish the dp gradient sync -> sum sequence-parallel
partial grads over tp -> optimizer step (unscale, norm, skip or clip, AdamW). The schedule is a
plain function argument (megamm.pipeline.schedules): gradient accumulation without pipelining, or
1F1B / interleaved 1F1B; all share one signature.

Loss normalization: each microbatch backpropagates `sum(per-token loss) / T`, where T is the number
of loss tokens in the whole global batch (all microbatches, all dp ranks; one small all-reduce before
the first forward). Gradients are then SUM-reduced over dp, so the result is the per-token mean over
the global batch exactly, whatever dp and accumulation are.

Context parallelism: the cp ranks of a replica share its microbatches, each computing the loss of
its own positions. T is counted from the whole microbatches' labels, so every cp rank counts the
same tokens and T is still summed over dp only; the loss sums and the gradients of replicated
parameters are partial over cp and are summed over dp x cp (`ParallelState.grad_group`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megamm.config.constants import IGNORE_INDEX
from megamm.config.resolved import ResolvedConfig
from megamm.models.language import loss_positions, shift_labels
from megamm.models.llava import HOST_INPUTS, LlavaModel
from megamm.optim.grad_buffer import GradBuffer
from megamm.optim.optimizer import DistributedOptimizer, MixedPrecisionOptimizer, ParamGroupSpec
from megamm.optim.schedules import DynamicLossScaler, LRSchedule
from megamm.parallel.grads import allreduce_sequence_parallel_grads
from megamm.parallel.mappings import group_size
from megamm.parallel.params import ParamSpec, specs_by_parameter
from megamm.parallel.phase import enter_phase
from megamm.parallel.state import ParallelState
from megamm.pipeline.schedules import PipelineSchedule, forward_backward_no_pipelining

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
    """What a step needs: this stage's model chunks, their parameter records, their gradient
    buffers, the optimizer, schedules and settings. Without pipelining there is one chunk."""

    config: ResolvedConfig
    state: ParallelState
    chunks: list[LlavaModel]
    param_specs: dict[nn.Parameter, ParamSpec]
    buffers: list[GradBuffer]
    optimizer: MixedPrecisionOptimizer | DistributedOptimizer
    lr_schedule: LRSchedule
    scaler: DynamicLossScaler | None
    forward_backward: ForwardBackward

    @property
    def model(self) -> LlavaModel:
        """The first chunk (the whole model without pipelining)."""
        return self.chunks[0]

    def parameters(self):
        return (p for chunk in self.chunks for p in chunk.parameters())


def param_group_specs(
    chunks: list[LlavaModel], weight_decay: float, lr: float, projector_lr: float | None,
    vision_lr: float | None = None,
) -> dict:
    """Weight decay except on biases and norms (1-D tensors); the projector's and the vision tower's
    own learning rates (as multiples of --lr, so they follow its warmup and decay). A native-resolution
    tower's patch merger is its projector (it is what --freeze-projector freezes), so it takes the
    projector's rate; the first matching prefix wins."""
    own_lr = {"projector.": projector_lr, "vision.merger.": projector_lr, "vision.": vision_lr}
    specs = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if not param.requires_grad:
                continue
            decay = weight_decay if param.dim() > 1 else 0.0
            module_lr = next((v for prefix, v in own_lr.items() if name.startswith(prefix)), None)
            specs[param] = ParamGroupSpec(decay, module_lr / lr if module_lr is not None else 1.0)
    return specs


def _gradient_buffers(config: ResolvedConfig, state: ParallelState, chunks: list[LlavaModel],
                      param_specs: dict[nn.Parameter, ParamSpec]) -> list[GradBuffer]:
    """One buffer per model chunk (the schedule runs all but a chunk's last backward inside its
    `no_sync()`), plus, with pipelining and tied embeddings, one for the embedding table copies of
    the first and last stage, synced over both stages' dp ranks as if they were dp replicas."""
    t = config.training
    shared = [
        p for chunk in chunks for p in chunk.parameters()
        if p.requires_grad and param_specs[p].tied is not None and state.pp_size > 1
    ]
    settings = {"bucket_size": t.ddp_bucket_size, "shard_for_optimizer": t.use_distributed_optimizer}
    buffers = []
    for chunk in chunks:
        params = [p for p in chunk.parameters() if p.requires_grad and not any(p is q for q in shared)]
        buffers.append(GradBuffer(params, state.grad_group, overlap=t.overlap_grad_reduce, **settings))
    if shared:
        buffers.append(GradBuffer(shared, state.embedding_dp_group, overlap=False, **settings))
    return buffers


def build_trainer(config: ResolvedConfig, state: ParallelState, chunks: list[LlavaModel]) -> Trainer:
    t = config.training
    param_specs = specs_by_parameter(chunks)
    buffers = _gradient_buffers(config, state, chunks, param_specs)
    optimizer_cls = DistributedOptimizer if t.use_distributed_optimizer else MixedPrecisionOptimizer
    optimizer = optimizer_cls(
        buffers,
        param_group_specs(chunks, t.weight_decay, t.lr, t.projector_lr, t.vision_lr),
        param_specs,
        state,
        lr=t.lr,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_eps,
    )
    schedule = LRSchedule(
        lr=t.lr,
        min_lr=t.min_lr,
        warmup_iters=t.lr_warmup_iters,
        decay_iters=config.lr_decay_iters,
        style=t.lr_decay_style,
    )
    scaler = DynamicLossScaler(t.initial_loss_scale, t.loss_scale_window) if t.fp16 else None
    if state.pp_size > 1:
        language = chunks[0].config.language.transformer
        seq = t.seq_length // state.cp_size // (state.tp_size if config.sequence_parallel else 1)
        forward_backward = PipelineSchedule(state, (seq, t.micro_batch_size, language.hidden_size),
                                            config.params_dtype)
    else:
        forward_backward = forward_backward_no_pipelining
    return Trainer(config, state, chunks, param_specs, buffers, optimizer, schedule, scaler, forward_backward)


def count_loss_tokens(microbatches: list[Batch]) -> int:
    """Loss tokens in these microbatches (0 on stages that hold no labels)."""
    return sum(
        int((shift_labels(mb["labels"]) != IGNORE_INDEX).sum()) for mb in microbatches if mb.get("labels") is not None
    )


def _sum_over(value: float, group, device: torch.device) -> float:
    tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
    if group_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor.item()


def _from_last_stage(values: list[float], state: ParallelState) -> list[float]:
    """The last pipeline stage's values on every stage, so every rank reports the same numbers."""
    if state.pp_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=state.device)
    dist.broadcast(tensor, src=state.pp_ranks[-1], group=state.pp_group)
    return tensor.tolist()


def _to_device(batch: Batch, state: ParallelState) -> Batch:
    """The microbatch on the rank's device, with the loss positions of its labels (if it holds
    labels) built first, on the host: the output layer and the loss run only there
    (`megamm.models.language.loss_positions`). The model's host inputs (`HOST_INPUTS`: token ids,
    grids, image sizes, counts) stay on the CPU, where the model plans its vision work from them.
    Both avoid a device-to-host synchronization per microbatch."""
    if batch.get("labels") is not None:
        batch = {**batch, "loss_positions": loss_positions(batch["labels"], state)}
    return {k: v.to(state.device, non_blocking=True) if torch.is_tensor(v) and k not in HOST_INPUTS else v
            for k, v in batch.items()}


def _set_mode(trainer: Trainer, training: bool) -> None:
    for chunk in trainer.chunks:
        chunk.train(training)


def _sequence_partial_grads(trainer: Trainer) -> list[torch.Tensor]:
    """The main grads that are partial sums over tp: over the sequence chunks of the tp ranks, or
    of a LoRA adapter's replicated factor (ParamSpec.partial_grad_over_tp)."""
    return [buffer.main_grad(p) for buffer in trainer.buffers for p in buffer.params
            if trainer.param_specs[p].partial_grad_over_tp]


def train_step(trainer: Trainer, microbatches: list[Batch], iteration: int) -> StepResult:
    state, t = trainer.state, trainer.config.training
    # Counted before the copy to the device, so counting costs no device synchronization.
    local_tokens = count_loss_tokens(microbatches)
    microbatches = [_to_device(mb, state) for mb in microbatches]
    _set_mode(trainer, True)
    for buffer in trainer.buffers:
        buffer.start_step()
    lr = trainer.lr_schedule(iteration)
    trainer.optimizer.set_lr(lr)
    enter_phase("loss-token count all-reduce over data parallel", waiting=True)
    total_tokens = _sum_over(local_tokens, state.dp_group, state.device)
    scale = trainer.scaler.scale if trainer.scaler is not None else 1.0
    loss_sum = trainer.forward_backward(
        trainer.chunks, microbatches, max(total_tokens, 1.0), trainer.buffers, loss_scale=scale
    )
    enter_phase("data-parallel gradient sync")
    for buffer in trainer.buffers:
        buffer.finish_grad_sync()
    enter_phase("sequence-parallel gradient all-reduce over tensor parallel", waiting=True)
    allreduce_sequence_parallel_grads(_sequence_partial_grads(trainer), state.tp_group)
    enter_phase("optimizer step (gradient norm, AdamW)")
    applied, grad_norm = trainer.optimizer.step(t.clip_grad, grad_scale=scale)
    if trainer.scaler is not None:
        trainer.scaler.update(overflow=not applied)
    enter_phase("loss all-reduce over data (x context) parallel", waiting=True)
    loss_sum_global = _sum_over(loss_sum.item(), state.grad_group, state.device)
    loss_sum_global, total_tokens = _from_last_stage([loss_sum_global, total_tokens], state)
    return StepResult(loss_sum_global / max(total_tokens, 1.0), grad_norm, applied, int(total_tokens), lr)


def evaluate(trainer: Trainer, global_batches: list[list[Batch]]) -> float:
    """Per-token mean loss over the given global batches (this rank's microbatches of each)."""
    state = trainer.state
    _set_mode(trainer, False)
    loss_sum, tokens = 0.0, 0.0
    for microbatches in global_batches:
        tokens += count_loss_tokens(microbatches)
        microbatches = [_to_device(mb, state) for mb in microbatches]
        loss_sum += trainer.forward_backward(trainer.chunks, microbatches, 1.0, None, forward_only=True).item()
    _set_mode(trainer, True)
    enter_phase("evaluation loss all-reduce over data parallel", waiting=True)
    loss_sum = _sum_over(loss_sum, state.grad_group, state.device)
    tokens = _sum_over(tokens, state.dp_group, state.device)
    loss_sum, tokens = _from_last_stage([loss_sum, tokens], state)
    return loss_sum / max(tokens, 1.0)
