"""bf16 and fp16 training track fp32 training, within bounds set by their rounding.

The tiny LLaVA (tests/tiny.py) trains 16 steps on one fixed global batch (2 microbatches of 2
synthetic samples, the same every step, so the loss falls steadily and every step's loss reflects
the whole trajectory so far), from the same seed, as fp32, as `--bf16` and as `--fp16` (the run
config's training.bf16 / fp16: parameters and compute in half precision, fp32 main grads and fp32
master weights in the optimizer, and for fp16 a dynamic loss scale of 2^16). Compared per step with
the fp32 run: the loss (train_step's per-token mean) and the global grad norm.

Tolerances. Unit roundoff u = 2^-8 for bf16 (8 significant bits), 2^-11 for fp16 (11 bits). Every
op of the forward rounds its output by up to u, but the loss is a mean over ~170 tokens of fp32 cross
entropies whose rounding errors are not correlated, so it lands much closer than u:

- loss, bf16: relative 2^-9 (u / 2, 1.95e-3). Measured at most 5.3e-4 over the 16 steps (3.7x margin).
- loss, fp16: relative 2^-12 (u / 2, 2.4e-4). Measured at most 7e-5 (3.5x margin).
- loss decrease over the 16 steps, relative to fp32's (0.45): 1.5% for bf16 (measured 0.2%), 0.5% for
  fp16 (measured 0.02%). This is the learning itself: it catches a run that drifts away even
  while each loss is still within the per-step bound.
- grad norm: gradients go through the whole backward in half precision, a few roundings more than
  the loss: relative 4u for bf16 (2^-6, 1.6e-2; measured 5.6e-3) and 2u for fp16 (2^-10, 9.8e-4;
  measured 2.2e-4). A wrong loss scale (not unscaled, or not applied) is off by the factor 2^16.

The learning rate is small on purpose (2e-4, constant): an AdamW step then moves a weight by about
2e-4, below half a bf16 spacing of the norm weights (~1.0: spacing 2^-8) and comparable to that of
the linear weights (|w| ~ 0.02: spacing 2^-13 = 1.2e-4). Only fp32 master weights accumulate such
updates; kept in bf16 they are rounded away or distorted every step, and the bf16 loss drifts from
fp32's (measured: 4.5e-3 relative after 16 steps, the decrease 4% short), beyond the bounds above.
"""

from __future__ import annotations

import pytest
import torch

from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.data.synthetic import SyntheticMultimodalDataset, collate
from megamm.models.llava import LlavaModel
from megamm.parallel.state import ParallelState
from megamm.training.step import build_trainer, train_step
from tests.tiny import llava_config

SEED = 5
STEPS = 16
SEQ = 48
MICRO, GLOBAL = 2, 4

LOSS_TOLERANCE = {"bf16": 2.0**-9, "fp16": 2.0**-12}
DECREASE_TOLERANCE = {"bf16": 0.015, "fp16": 0.005}
NORM_TOLERANCE = {"bf16": 2.0**-6, "fp16": 2.0**-10}


def _train(precision: str) -> dict:
    """STEPS steps on one fixed global batch; losses, grad norms, and what the optimizer holds."""
    flags = {"bf16": precision == "bf16", "fp16": precision == "fp16"}
    training = TrainingConfig(micro_batch_size=MICRO, global_batch_size=GLOBAL, seq_length=SEQ,
                              train_iters=STEPS, lr=2e-4, lr_decay_style="constant", clip_grad=1.0,
                              weight_decay=0.0, seed=SEED, mock_data=True, images_per_sample=2, **flags)
    config = RunConfig(model=llava_config(), training=training)
    state = ParallelState.single()
    state.seed(SEED)
    model = LlavaModel(resolve(config, 1).model, state)
    model.initialize(SEED)
    trainer = build_trainer(resolve(config, 1), state, [model])
    data = SyntheticMultimodalDataset(model.config, SEQ, SEED, max_images=2)
    starts = range(0, GLOBAL, MICRO)
    microbatches = [collate([data[i] for i in range(start, start + MICRO)]) for start in starts]
    losses, norms = [], []
    for iteration in range(STEPS):
        result = train_step(trainer, microbatches, iteration)
        assert result.applied, f"{precision}: step {iteration} skipped (non-finite gradients)"
        losses.append(result.loss)
        norms.append(result.grad_norm)
    pieces = trainer.optimizer.pieces
    return {
        "losses": losses,
        "norms": norms,
        "param_dtypes": {p.dtype for p in model.parameters()},
        "masters": [(piece.master.detach().clone(), piece.param.detach().clone()) for piece in pieces],
        "loss_scale": trainer.scaler.scale if trainer.scaler is not None else None,
    }


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    return {precision: _train(precision) for precision in ("fp32", "bf16", "fp16")}


def _relative(values: list[float], reference: list[float]) -> list[float]:
    return [abs(a - b) / abs(b) for a, b in zip(values, reference, strict=True)]


def test_runs_are_what_they_claim(runs: dict[str, dict]) -> None:
    """The half-precision runs have half-precision parameters, fp16 keeps its 2^16 loss scale (no
    overflow), and fp32 does learn (so the trajectories being compared move)."""
    assert runs["fp32"]["param_dtypes"] == {torch.float32}
    assert runs["bf16"]["param_dtypes"] == {torch.bfloat16}
    assert runs["fp16"]["param_dtypes"] == {torch.float16}
    assert runs["fp16"]["loss_scale"] == 2.0**16 and runs["bf16"]["loss_scale"] is None
    fp32 = runs["fp32"]["losses"]
    assert fp32[0] - fp32[-1] > 0.2, fp32


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_loss_per_step_tracks_fp32(runs: dict[str, dict], precision: str) -> None:
    errors = _relative(runs[precision]["losses"], runs["fp32"]["losses"])
    worst = max(range(STEPS), key=errors.__getitem__)
    assert errors[worst] <= LOSS_TOLERANCE[precision], (
        f"{precision}: step {worst} loss {runs[precision]['losses'][worst]:.6f} vs fp32 "
        f"{runs['fp32']['losses'][worst]:.6f}: relative {errors[worst]:.2e} > {LOSS_TOLERANCE[precision]:.2e}"
    )


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_loss_decrease_tracks_fp32(runs: dict[str, dict], precision: str) -> None:
    ours, fp32 = runs[precision]["losses"], runs["fp32"]["losses"]
    error = abs((ours[0] - ours[-1]) - (fp32[0] - fp32[-1])) / (fp32[0] - fp32[-1])
    assert error <= DECREASE_TOLERANCE[precision], (
        f"{precision}: loss fell by {ours[0] - ours[-1]:.5f}, fp32 by {fp32[0] - fp32[-1]:.5f} ({error:.2%})"
    )


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_grad_norm_per_step_tracks_fp32(runs: dict[str, dict], precision: str) -> None:
    """The global grad norm, after fp16 unscaling: catches a loss scale applied or removed wrongly."""
    errors = _relative(runs[precision]["norms"], runs["fp32"]["norms"])
    assert max(errors) <= NORM_TOLERANCE[precision], (
        f"{precision}: grad norms {runs[precision]['norms'][:3]}... vs fp32 {runs['fp32']['norms'][:3]}...: "
        f"relative {max(errors):.2e}"
    )


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_master_weights_are_fp32_and_finer_than_the_parameters(runs: dict[str, dict], precision: str) -> None:
    """Each optimizer master is a separate fp32 tensor whose value, rounded, is the parameter; and the
    masters hold information the half-precision parameters cannot (most are not representable)."""
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    finer = total = 0
    for master, param in runs[precision]["masters"]:
        assert master.dtype == torch.float32 and param.dtype == half
        assert torch.equal(master.to(half), param)
        finer += int((master.to(half).float() != master).sum())
        total += master.numel()
    assert finer > 0.5 * total, f"{precision}: only {finer} of {total} master values finer than {half}"
