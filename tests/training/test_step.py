"""Data parallelism, the distributed optimizer and tp x dp training equal the single-process run.

Each spawned job trains, on every rank, a single-process reference (its own size-1 groups) and the
parallel run from the same seed on the same global batches for a few steps, and reports the losses,
grad norms and the final weights (gathered over tp). Clipping is set low enough to be active, so
the global grad norm is compared too.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megamm.config import LlavaConfig, ParallelConfig
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.data.synthetic import SyntheticMultimodalDataset, collate, microbatch_indices
from megamm.models.llava import LlavaModel
from megamm.parallel.params import param_specs
from megamm.parallel.sharding import gather_master
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.training.step import build_trainer, train_step
from tests.distributed import run_distributed, solo_state
from tests.tiny import llava_config, qwen2_language_config, without_key_bias

STEPS = 3
TOLERANCE = 1e-5
# Adam divides by sqrt(v): for near-zero gradient elements it turns 1e-7 rounding differences of
# the gradient into larger relative weight differences, so updated weights get a looser bound.
WEIGHT_TOLERANCE = 5e-5


def _run_config(model: LlavaConfig | None = None, **training) -> RunConfig:
    defaults = {
        "micro_batch_size": 2, "global_batch_size": 8, "seq_length": 48, "train_iters": STEPS, "lr": 3e-3,
        "min_lr": 1e-4, "lr_warmup_iters": 1, "weight_decay": 0.1, "clip_grad": 0.5, "mock_data": True,
        "seed": 5, "images_per_sample": 2, "projector_lr": 1e-2,
    }
    defaults.update(training)
    return RunConfig(model=model or llava_config(), training=TrainingConfig(**defaults))


def _train(run: RunConfig, state: ParallelState, sequence_parallel: bool = False) -> dict:
    config = resolve(run, state.world_size)
    t = config.training
    state.seed(t.seed)
    model = LlavaModel(config.model, state, sequence_parallel=sequence_parallel)
    model.initialize(t.seed)
    specs = param_specs(model)
    initial = {name: gather_master(p.detach(), specs[name].layout, state.tp_group).clone()
               for name, p in model.named_parameters()}
    trainer = build_trainer(config, state, [model])
    data = SyntheticMultimodalDataset(model.config, t.seq_length, t.seed, t.images_per_sample)
    losses, norms = [], []
    for iteration in range(t.train_iters):
        indices = microbatch_indices(iteration * t.global_batch_size, t.global_batch_size, t.micro_batch_size,
                                     state.dp_rank, state.dp_size)
        result = train_step(trainer, [collate([data[i] for i in chunk]) for chunk in indices], iteration)
        assert result.applied
        losses.append(result.loss)
        norms.append(result.grad_norm)
    final = {name: gather_master(p.detach(), specs[name].layout, state.tp_group) for name, p in model.named_parameters()}
    final = {name: without_key_bias(name, tensor, model.config.language.transformer) for name, tensor in final.items()}
    frozen_unchanged = all(torch.equal(final[n], initial[n]) for n, p in model.named_parameters() if not p.requires_grad)
    return {"losses": losses, "norms": norms, "final": final, "frozen_unchanged": frozen_unchanged,
            "state_bytes": trainer.optimizer.state_bytes(),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _compare(run: dict, reference: dict) -> dict:
    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-12)

    weight_errors = {n: ((run["final"][n] - w).norm() / w.norm().clamp(min=1e-12)).item()
                     for n, w in reference["final"].items()}
    worst = max(weight_errors, key=weight_errors.get)
    return {
        "loss_error": max(rel(a, b) for a, b in zip(run["losses"], reference["losses"])),
        "norm_error": max(rel(a, b) for a, b in zip(run["norms"], reference["norms"])),
        "weight_error": weight_errors[worst],
        "worst_weight": worst,
        "frozen_unchanged": run["frozen_unchanged"] and reference["frozen_unchanged"],
        "clipped": reference["norms"][0] > 0.5,
        "loss_falls": run["losses"][-1] < run["losses"][0],
        "state_bytes": run["state_bytes"],
        "reference_state_bytes": reference["state_bytes"],
    }


def _dp2_job() -> dict:
    """2 ranks: dp=2 (plain, overlapped sync, distributed optimizer, frozen ViT) vs one process."""
    state = initialize_parallel_state(tensor_model_parallel_size=1)
    solo = solo_state()
    results = {}
    base = _run_config()
    reference = _train(base, solo)  # 4 microbatches of 2 on one rank
    results["dp2"] = _compare(_train(base, state), reference)  # 2 microbatches of 2 on each of 2 ranks
    results["dp2_overlap_small_buckets"] = _compare(
        _train(_run_config(overlap_grad_reduce=True, ddp_bucket_size=1000), state), reference
    )
    results["dp2_distributed_optimizer"] = _compare(
        _train(_run_config(use_distributed_optimizer=True, overlap_grad_reduce=True, ddp_bucket_size=5000), state),
        reference,
    )
    frozen = _run_config(freeze_ViT=True)
    results["dp2_freeze_vit"] = _compare(_train(frozen, state), _train(frozen, solo))
    return results


def _tp2_dp2_job() -> dict:
    """4 ranks: tp=2 x dp=2 with sequence parallelism (+ distributed optimizer) vs one process;
    dp=4 distributed optimizer for the state-size figure."""
    dp4 = initialize_parallel_state(tensor_model_parallel_size=1)
    solo = solo_state()
    tp2 = ParallelState.from_groups(tp=2, pp=1, device=torch.device("cpu"))
    base = _run_config()
    reference = _train(base, solo)
    results = {
        "tp2_dp2_sp": _compare(_train(base, tp2, sequence_parallel=True), reference),
        "tp2_dp2_sp_distributed_optimizer": _compare(
            _train(_run_config(use_distributed_optimizer=True, overlap_grad_reduce=True, ddp_bucket_size=3000),
                   tp2, sequence_parallel=True),
            reference,
        ),
        "dp4_distributed_optimizer": _compare(_train(_run_config(use_distributed_optimizer=True), dp4), reference),
    }
    # Qwen2's q/k/v-only bias: the fused QKV bias split over tp, under sequence parallelism.
    qwen2 = _run_config(model=llava_config(language=qwen2_language_config()))
    results["tp2_dp2_sp_qwen2"] = _compare(_train(qwen2, tp2, sequence_parallel=True), _train(qwen2, solo))
    return results


@pytest.fixture(scope="module")
def dp2_results() -> list[dict]:
    return run_distributed(_dp2_job, 2)


@pytest.fixture(scope="module")
def tp2_dp2_results() -> list[dict]:
    return run_distributed(_tp2_dp2_job, 4)


def _check(per_rank: list[dict], case: str) -> None:
    for rank, results in enumerate(per_rank):
        r = results[case]
        assert r["clipped"], "clipping must be active for the norm comparison to mean something"
        assert r["loss_error"] < TOLERANCE, f"rank {rank}: loss relative error {r['loss_error']}"
        assert r["norm_error"] < TOLERANCE, f"rank {rank}: grad norm relative error {r['norm_error']}"
        assert r["weight_error"] < WEIGHT_TOLERANCE, (
            f"rank {rank}: updated weights relative error {r['weight_error']} ({r['worst_weight']})")
        assert r["frozen_unchanged"], f"rank {rank}: a frozen parameter changed"
        assert r["loss_falls"], f"rank {rank}: loss did not fall"


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["dp2", "dp2_overlap_small_buckets", "dp2_distributed_optimizer", "dp2_freeze_vit"]
)
def test_data_parallel_matches_single_process(dp2_results: list[dict], case: str) -> None:
    _check(dp2_results, case)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["tp2_dp2_sp", "tp2_dp2_sp_distributed_optimizer", "dp4_distributed_optimizer", "tp2_dp2_sp_qwen2"]
)
def test_tensor_and_data_parallel_match_single_process(tp2_dp2_results: list[dict], case: str) -> None:
    _check(tp2_dp2_results, case)


@pytest.mark.slow
def test_distributed_optimizer_state_shrinks_with_dp(dp2_results: list[dict], tp2_dp2_results: list[dict]) -> None:
    """fp32 params: plain AdamW holds m and v (8 bytes/param); sharded, master + m + v = 12/dp."""
    single = dp2_results[0]["dp2"]["reference_state_bytes"]
    dp2 = max(r["dp2_distributed_optimizer"]["state_bytes"] for r in dp2_results)
    dp4 = max(r["dp4_distributed_optimizer"]["state_bytes"] for r in tp2_dp2_results)
    assert dp2 < 0.80 * single
    assert dp4 < 0.45 * single
    assert dp4 < 0.6 * dp2


def test_parallel_config_is_used_by_tests() -> None:
    """The reference and parallel runs differ only in layout: the model config validates at tp=2."""
    assert llava_config().problems(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), 48) == []
    assert replace(_run_config(), parallel=ParallelConfig(tensor_model_parallel_size=2)).problems(4) == []
