"""LoRA / DoRA training at tp=2, tp=2 with sequence parallelism, pp=2 and dp=2 equals one process.

One spawned job of 2 ranks trains, on every rank, the single-process reference (its own size-1
groups) and each layout from the same seed on the same global batches, through the real training
step (gradient buffers, the tp sum of the adapters' partial grads, AdamW), and reports the losses,
grad norms, the first step's gradients and the final trainable tensors, gathered over tp into
their master layout (pipeline stages report their own; the test joins them). The adapters' B
matrices (and DoRA's magnitudes) start away from their PEFT init, so every adapter tensor has a
gradient at the first step. The targets leave some fused parts (k_proj, gate_proj) and the
projector out: the projector, not frozen, trains fully next to the adapters. A linear projector
(a column-parallel layer that gathers its output) with an adapter is checked at tp=2 with SP too.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megamm.config import LlavaConfig, ParallelConfig, ProjectorConfig
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.data.synthetic import SyntheticMultimodalDataset, collate, microbatch_indices
from megamm.models.lora import is_adapter_parameter, reset_magnitudes
from megamm.parallel.params import param_specs
from megamm.parallel.sharding import gather_master
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.pipeline.chunks import build_model_chunks
from megamm.training.step import build_trainer, train_step
from tests.adapters import perturb_adapters
from tests.distributed import run_distributed, solo_state
from tests.tiny import llava_config

STEPS = 3
TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 5e-5  # Adam's 1/sqrt(v) amplifies rounding of tiny grads (tests/training/test_step.py)
TARGETS = "q_proj,v_proj,o_proj,up_proj,down_proj,vision"


def _run_config(model: LlavaConfig | None = None, **training) -> RunConfig:
    defaults = {
        "micro_batch_size": 2, "global_batch_size": 8, "seq_length": 48, "train_iters": STEPS, "lr": 3e-3,
        "lr_warmup_iters": 0, "clip_grad": 0.0, "mock_data": True, "seed": 5, "images_per_sample": 2,
        "lora_rank": 4, "lora_alpha": 8.0, "lora_target_modules": [TARGETS],
    }
    defaults.update(training)
    return RunConfig(model=model or llava_config(), training=TrainingConfig(**defaults))


def _train(run: RunConfig, state: ParallelState, sequence_parallel: bool = False, pp: int = 1) -> dict:
    parallel = ParallelConfig(tensor_model_parallel_size=state.tp_size, pipeline_model_parallel_size=pp,
                              sequence_parallel=sequence_parallel)
    config = resolve(replace(run, parallel=parallel), state.world_size)
    t = config.training
    state.seed(t.seed)
    chunks = build_model_chunks(config, state)
    reset_magnitudes(chunks)
    perturb_adapters(chunks, state)
    specs = {name: spec for chunk in chunks for name, spec in param_specs(chunk).items()}

    def gathered(chunk_values) -> dict[str, torch.Tensor]:
        return {name: gather_master(value.detach(), specs[name].layout, state.tp_group).clone()
                for name, value in chunk_values}

    named = [(n, p) for chunk in chunks for n, p in chunk.named_parameters()]
    frozen_before = gathered((n, p) for n, p in named if not p.requires_grad)
    trainer = build_trainer(config, state, chunks)
    data = SyntheticMultimodalDataset(config.model, t.seq_length, t.seed, t.images_per_sample)
    losses, norms, first_grads = [], [], {}
    for iteration in range(t.train_iters):
        indices = microbatch_indices(iteration * t.global_batch_size, t.global_batch_size, t.micro_batch_size,
                                     state.dp_rank, state.dp_size)
        result = train_step(trainer, [collate([data[i] for i in chunk]) for chunk in indices], iteration)
        assert result.applied
        losses.append(result.loss)
        norms.append(result.grad_norm)
        if iteration == 0 and not t.use_distributed_optimizer:
            first_grads = gathered((n, buffer.main_grad(p)) for n, p in named for buffer in trainer.buffers
                                   if any(p is q for q in buffer.params))
    frozen_after = gathered((n, p) for n, p in named if not p.requires_grad)
    return {
        "losses": losses, "norms": norms, "grads": first_grads,
        "final": gathered((n, p) for n, p in named if p.requires_grad),
        "frozen_unchanged": all(torch.equal(frozen_after[n], frozen_before[n]) for n in frozen_before),
        "trainable": sorted(n for n, p in named if p.requires_grad),
        "state_bytes": trainer.optimizer.state_bytes(),
    }


def _job() -> dict:
    initialize_parallel_state(tensor_model_parallel_size=1)
    solo = solo_state()
    tp2 = ParallelState.from_groups(tp=2, pp=1, device=torch.device("cpu"))
    pp2 = ParallelState.from_groups(tp=1, pp=2, device=torch.device("cpu"))
    dp2 = ParallelState.from_groups(tp=1, pp=1, device=torch.device("cpu"))
    full = _train(_run_config(lora_rank=None, lora_alpha=None, lora_target_modules=None), dp2)
    linear, linear_targets = llava_config(projector=ProjectorConfig(type="linear")), "projector,o_proj"
    return {
        "reference": _train(_run_config(), solo),
        "tp2": _train(_run_config(), tp2),
        "tp2_sp": _train(_run_config(), tp2, sequence_parallel=True),
        "pp2": _train(_run_config(), pp2, pp=2),
        "dp2": _train(_run_config(), dp2),
        "dp2_distributed_optimizer": _train(_run_config(use_distributed_optimizer=True), dp2),
        "dora_reference": _train(_run_config(lora_use_dora=True), solo),
        "dora_tp2_sp": _train(_run_config(lora_use_dora=True), tp2, sequence_parallel=True),
        "full_finetuning_state_bytes": full["state_bytes"],
        # The linear projector gathers its column-parallel output: the adapter's rows go with it.
        "linear_projector_reference": _train(_run_config(linear, lora_target_modules=[linear_targets]), solo),
        "linear_projector_tp2_sp": _train(_run_config(linear, lora_target_modules=[linear_targets]), tp2,
                                          sequence_parallel=True),
    }


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_job, 2)


def _joined(per_rank: list[dict], case: str, key: str) -> dict[str, torch.Tensor]:
    """A tensor table over every rank's pipeline stage (tp and dp peers report the same tensors)."""
    out: dict[str, torch.Tensor] = {}
    for results in per_rank:
        out.update(results[case][key])
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


@pytest.mark.slow
@pytest.mark.parametrize(("case", "reference"), [
    ("tp2", "reference"), ("tp2_sp", "reference"), ("pp2", "reference"), ("dp2", "reference"),
    ("dp2_distributed_optimizer", "reference"), ("dora_tp2_sp", "dora_reference"),
    ("linear_projector_tp2_sp", "linear_projector_reference"),
])
def test_lora_training_matches_single_process(results: list[dict], case: str, reference: str) -> None:
    ref = results[0][reference]
    assert len(set(ref["losses"])) == STEPS, "each update must change the loss for the comparison to mean something"
    untargeted = ("vision.",) if case.startswith("linear_projector") else ("projector.",)
    expected_trainable = {n for n in ref["trainable"] if is_adapter_parameter(n) or n.startswith(untargeted)}
    assert set(ref["trainable"]) == expected_trainable, "only adapters and the untargeted part train"
    for rank, per_rank in enumerate(results):
        run = per_rank[case]
        for a, b in zip(run["losses"], ref["losses"]):
            assert abs(a - b) / abs(b) < TOLERANCE, f"rank {rank}: loss {a} vs {b}"
        for a, b in zip(run["norms"], ref["norms"]):
            assert abs(a - b) / abs(b) < TOLERANCE, f"rank {rank}: grad norm {a} vs {b}"
        assert run["frozen_unchanged"], f"rank {rank}: a frozen base parameter changed"
    final = _joined(results, case, "final")
    assert set(final) == set(ref["final"])
    for name, tensor in ref["final"].items():
        assert _relative(final[name], tensor) < WEIGHT_TOLERANCE, f"{case}: {name} after {STEPS} steps"
    grads = _joined(results, case, "grads")
    for name, grad in ref["grads"].items():
        if case == "dp2_distributed_optimizer":
            break  # its main grads are sharded over dp; the losses, norms and weights above cover it
        assert grad.norm() > 0, f"{name} has no gradient at the first step"
        assert _relative(grads[name], grad) < TOLERANCE, f"{case}: first-step gradient of {name}"


@pytest.mark.slow
def test_lora_optimizer_state_is_a_fraction_of_full_finetuning(results: list[dict]) -> None:
    """AdamW holds state for what trains only: the adapters and the projector, not the frozen base."""
    lora, full = results[0]["dp2"]["state_bytes"], results[0]["full_finetuning_state_bytes"]
    assert lora < 0.5 * full, (lora, full)
