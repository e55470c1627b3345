"""Pipeline parallelism equals the single-process run: 1F1B and interleaved schedules, uneven
splits, tp x pp, pp x dp, tied embeddings, a frozen vision tower and text-only data.

One spawned 4-rank job trains a few steps of every layout and, on every rank, a single-process
reference (its own size-1 groups) from the same seed on the same data, and reports losses, grad
norms, evaluation losses and the final weights of the parameters the rank holds (gathered over tp).
The pipeline's last stage runs the output layer and the loss at the loss positions only, as training
does; the reference computes the full logits, so the selection is checked against the plain
computation on every layout.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from megamm.config import ParallelConfig
from megamm.config.layout import layout_problems, schedule_problems, stage_layers
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.data.loader import ResumePoint
from megamm.parallel.params import param_specs
from megamm.parallel.sharding import gather_master
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.pipeline.chunks import build_model_chunks
from megamm.pipeline.schedules import schedule_order
from megamm.training.data import SyntheticData
from megamm.training.step import build_trainer, evaluate, train_step
from tests.distributed import run_distributed, solo_state
from tests.tiny import language_config, llava_config

STEPS = 2
TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 5e-5  # see test_training_parity: Adam amplifies rounding of near-zero grads


def _config(parallel: ParallelConfig, global_batch: int = 8, tied: bool = False, **training) -> RunConfig:
    language = replace(language_config(num_layers=8), tie_word_embeddings=tied)
    settings = {
        "micro_batch_size": 1, "global_batch_size": global_batch, "seq_length": 48, "train_iters": STEPS,
        "lr": 3e-3, "clip_grad": 0.5, "weight_decay": 0.1, "mock_data": True, "seed": 3, "images_per_sample": 2,
    }
    settings.update(training)
    return RunConfig(model=llava_config(language=language), parallel=parallel, training=TrainingConfig(**settings))


def _train(run: RunConfig, state: ParallelState, full_logits: bool = False) -> dict:
    config = resolve(run, state.world_size)
    t = config.training
    state.seed(t.seed)
    chunks = build_model_chunks(config, state)
    if full_logits:  # the output layer at every position (the loss is the same, computed the plain way)
        for chunk in chunks:
            chunk.forward = functools.partial(chunk.forward, return_logits=True)
    trainer = build_trainer(config, state, chunks)
    data = SyntheticData(config, state, ResumePoint())
    losses, norms = [], []
    for iteration in range(t.train_iters):
        result = train_step(trainer, data.microbatches(iteration), iteration)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    eval_loss = evaluate(trainer, [data.batches_at(data.train, (100 + i) * config.training.global_batch_size) for i in range(2)])
    final = {
        name: gather_master(p.detach(), param_specs(chunk)[name].layout, state.tp_group)
        for chunk in chunks for name, p in chunk.named_parameters()
    }
    return {"losses": losses, "norms": norms, "eval": eval_loss, "final": final}


def _errors(run: dict, reference: dict) -> dict:
    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-12)

    return {
        "loss": max(rel(a, b) for a, b in zip(run["losses"], reference["losses"])),
        "norm": max(rel(a, b) for a, b in zip(run["norms"], reference["norms"])),
        "eval": rel(run["eval"], reference["eval"]),
        "weight": max(
            ((w - reference["final"][n]).norm() / reference["final"][n].norm().clamp(min=1e-12)).item()
            for n, w in run["final"].items()
        ),
        "held": len(run["final"]),
    }


CASES = {
    # name: (tp, pp, parallel-config overrides, model/training overrides)
    "pp4_1f1b": (1, 4, {}, {}),
    "pp4_interleaved_vp2": (1, 4, {"num_layers_per_virtual_pipeline_stage": 1}, {}),
    "pp4_uneven_first1_last1": (1, 4, {"decoder_first_pipeline_num_layers": 1, "decoder_last_pipeline_num_layers": 1}, {}),
    "pp4_one_microbatch": (1, 4, {}, {"global_batch": 1}),
    "pp4_many_microbatches_interleaved": (1, 4, {"num_layers_per_virtual_pipeline_stage": 2}, {"global_batch": 16}),
    "tp2_pp2_sp": (2, 2, {"sequence_parallel": True}, {}),
    "pp2_dp2_tied_distributed_optimizer": (1, 2, {}, {"tied": True, "use_distributed_optimizer": True,
                                                      "overlap_grad_reduce": True}),
    "pp2_dp2_tied_interleaved": (1, 2, {"num_layers_per_virtual_pipeline_stage": 2}, {"tied": True}),
    "pp2_dp2_frozen_vision": (1, 2, {}, {"freeze_ViT": True}),
    "pp2_dp2_text_only": (1, 2, {}, {"images_per_sample": 0}),
}


def _pipeline_job() -> dict:
    initialize_parallel_state()
    solo = solo_state()
    states = {(tp, pp): ParallelState.from_groups(tp=tp, pp=pp, device=torch.device("cpu"))
              for tp, pp in {(c[0], c[1]) for c in CASES.values()}}
    results = {}
    for name, (tp, pp, parallel, overrides) in CASES.items():
        overrides = dict(overrides)
        config = _config(
            ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **parallel),
            **overrides,
        )
        problems = config.problems(4)
        assert not problems, f"{name}: {problems}"
        reference_config = replace(config, parallel=ParallelConfig())
        results[name] = _errors(_train(config, states[(tp, pp)]), _train(reference_config, solo, full_logits=True))
    return results


@pytest.fixture(scope="module")
def pipeline_results() -> list[dict]:
    return run_distributed(_pipeline_job, 4, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_single_process(pipeline_results: list[dict], case: str) -> None:
    for rank, results in enumerate(pipeline_results):
        errors = results[case]
        assert errors["held"] > 0, f"rank {rank} holds no parameters"
        assert errors["loss"] < TOLERANCE, f"rank {rank}: loss relative error {errors['loss']}"
        assert errors["norm"] < TOLERANCE, f"rank {rank}: grad norm relative error {errors['norm']}"
        assert errors["eval"] < TOLERANCE, f"rank {rank}: evaluation loss relative error {errors['eval']}"
        assert errors["weight"] < WEIGHT_TOLERANCE, f"rank {rank}: updated weights relative error {errors['weight']}"


def test_layer_placement() -> None:
    assert stage_layers(8, 4, 1) == [range(2, 4)]
    assert stage_layers(8, 4, 1, layers_per_virtual_stage=1) == [range(1, 2), range(5, 6)]
    assert [stage_layers(8, 4, r, None, 1, 1) for r in range(4)] == [[range(1)], [range(1, 4)], [range(4, 7)],
                                                                      [range(7, 8)]]
    assert stage_layers(6, 2, 0, None, 2) == [range(2)] and stage_layers(6, 2, 1, None, 2) == [range(2, 6)]


def test_layout_errors_are_clear() -> None:
    assert layout_problems(6, 4) == ["6 language layers are not divisible by 4 pipeline stages"]
    assert "do not split into 4 stages x chunks of 2" in layout_problems(12, 4, 2)[0]
    assert "do not split evenly over the other 2 stages" in layout_problems(8, 4, None, 1, 2)[0]
    assert "cannot be combined with virtual" in layout_problems(8, 2, 2, 1)[0]
    assert "positive multiple of the 4 pipeline stages" in schedule_problems(4, 2, 6)[0]
    assert "positive multiple of the 4 pipeline stages" in schedule_problems(4, 2, 2)[0]
    assert schedule_problems(4, 1, 1) == []


@pytest.mark.parametrize(("pp", "vp", "microbatches"), [(2, 1, 1), (4, 1, 3), (4, 2, 4), (4, 2, 12), (2, 3, 6)])
def test_schedule_runs_every_forward_before_its_backward(pp: int, vp: int, microbatches: int) -> None:
    """Each rank's order covers every (chunk, microbatch) once forward and once backward, forward first,
    and a stage's chunk-c forward of a microbatch comes after the previous virtual stage produced it."""
    orders = [schedule_order(pp, r, vp, microbatches, forward_only=False) for r in range(pp)]
    for order in orders:
        forwards = [(c, m) for kind, c, m in order if kind == "F"]
        backwards = [(c, m) for kind, c, m in order if kind == "B"]
        expected = {(c, m) for c in range(vp) for m in range(microbatches)}
        assert set(forwards) == expected and set(backwards) == expected and len(forwards) == len(expected)
        for c, m in expected:
            assert order.index(("F", c, m)) < order.index(("B", c, m))
        # Microbatches of one chunk go forward (and backward) in order: the p2p channels are FIFO.
        for c in range(vp):
            assert [m for cc, m in forwards if cc == c] == list(range(microbatches))
            assert [m for cc, m in backwards if cc == c] == list(range(microbatches))


def test_pipeline_config_needs_multiple_of_stages_for_interleaving() -> None:
    config = _config(ParallelConfig(pipeline_model_parallel_size=4, num_layers_per_virtual_pipeline_stage=1),
                     global_batch=6)
    assert any("positive multiple of the 4 pipeline stages" in p for p in config.problems(4))
