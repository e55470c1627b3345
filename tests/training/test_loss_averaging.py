"""The loss is averaged per token of the global batch, whatever the micro-batch size.

megamm.training.step counts the loss tokens T of the whole global batch before the first forward and
backpropagates `sum(per-token loss) / T` for every microbatch, so gradient accumulation over any
split of the batch gives the gradient of the global per-token mean. The bug this guards against is
the common one: averaging each microbatch over its own tokens (and then over microbatches), which
weights a token of a short sample more than a token of a long one. It is invisible when all samples
have the same number of loss tokens, so the 8 samples here have very uneven counts (1 to 45).

One process, fp32: the same global batch of 8 samples is trained as 1 microbatch of 8, 2 of 4 and
8 of 1 through `build_trainer` / `train_step` (the machinery megamm.train uses), for two steps. The
losses, grad norms, the accumulated gradients of both steps and the updated parameters must agree
to fp32 rounding (relative 1e-5), and the 1x8 gradient must equal the autograd gradient of the
per-token mean computed directly on the whole batch.
"""

from __future__ import annotations

import pytest
import torch

from megamm.config.constants import IGNORE_INDEX
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.data.synthetic import collate
from megamm.models.llava import LlavaModel
from megamm.parallel.state import ParallelState
from megamm.training.step import build_trainer, count_loss_tokens, train_step
from tests.tiny import llava_config, make_batch

SEED = 11
SEQ = 48
GLOBAL_BATCH = 8
IMAGES = [2, 1, 0, 2, 0, 0, 1, 0]
# Loss tokens kept per sample (the last ones of each row, all text): from 1 to 45 of 48.
KEEP = [1, 3, 2, 12, 40, 45, 25, 7]
STEPS = 2
TOLERANCE = 1e-5


def _samples() -> list[dict[str, torch.Tensor]]:
    """8 samples (tests/tiny.make_batch) whose labels keep only the last KEEP[i] next-token targets."""
    batch = make_batch(llava_config(), IMAGES, seq_length=SEQ, seed=SEED)
    samples, start = [], 0
    for i, count in enumerate(IMAGES):
        labels = batch["labels"][i].clone()
        labels[: SEQ - KEEP[i]] = IGNORE_INDEX
        # Targets are labels shifted by one: label position 0 never counts, the rest all do here.
        assert (labels[1:] != IGNORE_INDEX).sum() == KEEP[i], "a kept label fell on an image position"
        pixels = batch["pixel_values"][start : start + count]
        start += count
        samples.append({"input_ids": batch["input_ids"][i], "labels": labels, "pixel_values": pixels})
    return samples


def _run_config(micro_batch_size: int) -> RunConfig:
    # clip_grad=0: the accumulated main grads are left as backward made them, so they can be compared.
    training = TrainingConfig(mock_data=True, micro_batch_size=micro_batch_size, global_batch_size=GLOBAL_BATCH,
                              seq_length=SEQ, train_iters=STEPS, lr=1e-3, lr_decay_style="constant",
                              clip_grad=0.0, weight_decay=0.1, seed=SEED)
    return RunConfig(model=llava_config(), training=training)


def _model(config: RunConfig, state: ParallelState) -> LlavaModel:
    state.seed(SEED)
    model = LlavaModel(resolve(config, 1).model, state)
    model.initialize(SEED)
    return model


def _train(micro_batch_size: int) -> dict:
    """Two steps on the same global batch split into microbatches of `micro_batch_size`."""
    config = _run_config(micro_batch_size)
    state = ParallelState.single()
    model = _model(config, state)
    trainer = build_trainer(resolve(config, 1), state, [model])
    samples = _samples()
    starts = range(0, GLOBAL_BATCH, micro_batch_size)
    microbatches = [collate(samples[i : i + micro_batch_size]) for i in starts]
    assert count_loss_tokens(microbatches) == sum(KEEP)
    losses, norms, grads = [], [], []
    for iteration in range(STEPS):
        result = train_step(trainer, microbatches, iteration)
        assert result.applied and result.loss_tokens == sum(KEEP)
        losses.append(result.loss)
        norms.append(result.grad_norm)
        buffer = trainer.buffers[0]
        grads.append({name: buffer.main_grad(p).clone() for name, p in model.named_parameters() if p.requires_grad})
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"losses": losses, "norms": norms, "grads": grads, "params": params}


def _direct_gradient() -> tuple[float, dict[str, torch.Tensor]]:
    """The per-token mean over the whole batch and its gradient, by plain autograd (no trainer)."""
    config = _run_config(GLOBAL_BATCH)
    model = _model(config, ParallelState.single())
    output = model(**collate(_samples()))
    loss = output["loss"].sum() / sum(KEEP)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.fixture(scope="module")
def runs() -> dict[int, dict]:
    return {size: _train(size) for size in (8, 4, 1)}


def test_samples_have_very_uneven_loss_token_counts() -> None:
    """Per-microbatch averaging would weight a token of sample 0 (1 token) 45x one of sample 5."""
    counts = [count_loss_tokens([collate([s])]) for s in _samples()]
    assert counts == KEEP and max(counts) / min(counts) >= 40


def test_one_microbatch_is_the_per_token_mean(runs: dict[int, dict]) -> None:
    """1 x 8: the step's loss and first gradient are those of sum(loss) / T on the whole batch."""
    loss, grads = _direct_gradient()
    assert abs(runs[8]["losses"][0] - loss) <= TOLERANCE * loss
    worst = max(_relative(runs[8]["grads"][0][name], g) for name, g in grads.items())
    assert worst < TOLERANCE, f"1x8 gradient vs direct per-token mean: relative error {worst:.2e}"


@pytest.mark.parametrize("micro_batch_size", [4, 1], ids=["2x4", "8x1"])
def test_gradient_accumulation_matches_one_microbatch(runs: dict[int, dict], micro_batch_size: int) -> None:
    """2 x 4 and 8 x 1 give the 1 x 8 losses, grad norms, gradients (both steps) and parameters."""
    run, reference = runs[micro_batch_size], runs[8]
    for step in range(STEPS):
        assert abs(run["losses"][step] - reference["losses"][step]) <= TOLERANCE * reference["losses"][step]
        norm_error = abs(run["norms"][step] - reference["norms"][step]) / reference["norms"][step]
        assert norm_error < TOLERANCE, f"step {step}: grad norm relative error {norm_error:.2e}"
        grad_errors = {n: _relative(g, reference["grads"][step][n]) for n, g in run["grads"][step].items()}
        worst = max(grad_errors, key=grad_errors.get)
        assert grad_errors[worst] < TOLERANCE, (
            f"step {step}: gradient of {worst} differs by {grad_errors[worst]:.2e} (relative)"
        )
    param_errors = {n: _relative(p, reference["params"][n]) for n, p in run["params"].items()}
    worst = max(param_errors, key=param_errors.get)
    assert param_errors[worst] < TOLERANCE, f"updated {worst} differs by {param_errors[worst]:.2e} (relative)"
