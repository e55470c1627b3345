"""Learning-rate schedules, the loss scaler and the gradient buffer layout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from megamm.optim.grad_buffer import GradBuffer
from megamm.optim.schedules import DynamicLossScaler, LRSchedule


def test_warmup_then_cosine_to_min_lr() -> None:
    schedule = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=4, decay_iters=14, style="cosine")
    assert [schedule(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == pytest.approx(1.0)
    assert schedule(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(14) == pytest.approx(0.1) and schedule(100) == pytest.approx(0.1)


def test_linear_and_constant() -> None:
    linear = LRSchedule(lr=2.0, min_lr=0.0, warmup_iters=0, decay_iters=10, style="linear")
    assert linear(0) == 2.0 and linear(5) == pytest.approx(1.0) and linear(10) == 0.0
    assert LRSchedule(lr=2.0, warmup_iters=2, decay_iters=10, style="constant")(7) == 2.0


def test_loss_scaler_halves_on_overflow_and_grows() -> None:
    scaler = DynamicLossScaler(initial_scale=8.0, growth_interval=2)
    scaler.update(overflow=True)
    assert scaler.scale == 4.0
    scaler.update(overflow=False)
    scaler.update(overflow=False)
    assert scaler.scale == 8.0


def test_buckets_pad_to_dp_and_skip_frozen_parameters() -> None:
    """With dp=1 padding is a no-op; frozen parameters get no buffer space or main grad."""
    trainable = [nn.Parameter(torch.randn(3, 5)), nn.Parameter(torch.randn(7))]
    frozen = nn.Parameter(torch.randn(100), requires_grad=False)
    buffer = GradBuffer([trainable[0], frozen, trainable[1]], dp_group=None, bucket_size=10)
    assert buffer.numel == 22
    with pytest.raises(KeyError, match="no main grad"):
        buffer.main_grad(frozen)
    # Reverse order: the last parameter comes first in the buffer.
    assert buffer.offsets[trainable[1]] == (0, 7) and buffer.offsets[trainable[0]] == (7, 22)
    assert [len(b.params) for b in buffer.buckets] == [2]


def test_hook_accumulates_grads_into_fp32_main_grad() -> None:
    weight = nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    buffer = GradBuffer([weight], dp_group=None)
    buffer.start_step()
    for _ in range(3):
        (weight.float() * torch.arange(4.0)).sum().backward()
    assert weight.grad is None
    assert buffer.main_grad(weight).dtype == torch.float32
    assert torch.equal(buffer.main_grad(weight), 3 * torch.arange(4.0))


def test_projector_and_vision_learning_rates_scale_their_groups() -> None:
    from megamm.models.llava import LlavaModel
    from megamm.parallel.state import ParallelState
    from megamm.training.step import param_group_specs
    from tests.tiny import llava_config

    model = LlavaModel(llava_config(), ParallelState.single())
    specs = param_group_specs([model], 0.1, 1e-3, projector_lr=2e-3, vision_lr=1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    scales = {names[id(p)].split(".")[0]: spec.lr_scale for p, spec in specs.items()}
    assert scales == {"vision": 0.1, "projector": 2.0, "language": 1.0}
    decays = {names[id(p)]: spec.weight_decay for p, spec in specs.items()}
    assert decays["vision.patch_embedding"] == 0.1 and decays["projector.fc1.bias"] == 0.0


def test_native_tower_merger_takes_the_projector_learning_rate() -> None:
    from megamm.models.llava import LlavaModel
    from megamm.parallel.state import ParallelState
    from megamm.training.step import param_group_specs
    from tests.tiny import qwen2_vl_config

    model = LlavaModel(qwen2_vl_config(), ParallelState.single())
    specs = param_group_specs([model], 0.1, 1e-3, projector_lr=2e-3, vision_lr=1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    scales = {}
    for param, spec in specs.items():
        part = names[id(param)].split(".")
        scales.setdefault("merger" if part[1] == "merger" else part[0], set()).add(spec.lr_scale)
    assert scales == {"vision": {0.1}, "merger": {2.0}, "language": {1.0}}


def test_update_is_torch_adamw_after_clipping_to_the_global_norm() -> None:
    """megamm's optimizer step (fused AdamW over the masters, gradients scaled and clipped in place)
    equals torch's per-tensor AdamW after `clip_grad_norm_` on the same weights and gradients."""
    from megamm.optim.optimizer import MixedPrecisionOptimizer, ParamGroupSpec
    from megamm.parallel.params import ParamSpec
    from megamm.parallel.sharding import ParamLayout
    from megamm.parallel.state import ParallelState

    generator = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (5,), (3, 6)]
    params = [nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    reference = [nn.Parameter(p.detach().clone()) for p in params]
    buffer = GradBuffer(params, dp_group=None)
    groups = {p: ParamGroupSpec(weight_decay=0.1, lr_scale=1.0) for p in params}
    specs = {p: ParamSpec(ParamLayout(tuple(p.shape), nn.init.zeros_)) for p in params}
    optimizer = MixedPrecisionOptimizer([buffer], groups, specs, ParallelState.single(), lr=1e-2)
    torch_adam = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(3):
        grads = [10 * torch.randn(shape, generator=generator) for shape in shapes]  # norm ~ 70 > clip
        buffer.start_step()
        for param, grad in zip(params, grads):
            buffer.main_grad(param).copy_(grad * 4.0)  # as if the loss had been scaled by 4
        applied, norm = optimizer.step(clip_grad=1.0, grad_scale=4.0)
        for param, grad in zip(reference, grads):
            param.grad = grad.clone()
        expected_norm = torch.nn.utils.clip_grad_norm_(reference, 1.0).item()
        torch_adam.step()
        assert applied and math.isclose(norm, expected_norm, rel_tol=1e-6), (step, norm, expected_norm)
        for mine, theirs in zip(params, reference):
            torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)
