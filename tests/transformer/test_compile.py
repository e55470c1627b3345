"""--torch-compile (each TransformerLayer compiled, megamm.transformer.compile) trains exactly as eager.

Every case trains the tiny LLaVA model for two optimizer steps through the training code path
(build_model_chunks applies the compilation, train_step drives it) once eagerly and once compiled
from the same seed on the same batches, and compares the losses, the grad norms (clipping is
active), an evaluation loss (no_grad: a graph of its own) and the final weights. The spawned run
compares tensor + sequence parallelism and pipeline parallelism, compiled, with one eager process,
and carries the LoRA / DoRA cases: compilation dominates every case's time (an eager run of the tiny
model takes well under a second), so each configuration is compiled once, in the layout that
checks the most (DoRA's row-parallel norms at tp=2, LoRA's adapters on the tp=1 layers of a stage).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megamm.config import ParallelConfig
from megamm.config.model import ConfigError
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.models.lora import reset_magnitudes
from megamm.parallel.params import param_specs
from megamm.parallel.sharding import gather_master
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.pipeline.chunks import build_model_chunks
from megamm.training.data import ResumePoint, SyntheticData
from megamm.training.step import build_trainer, evaluate, train_step
from megamm.transformer.layer import TransformerLayer
from tests.adapters import perturb_adapters
from tests.distributed import run_distributed, solo_state
from tests.tiny import language_config, llava_config

TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 5e-5  # Adam amplifies rounding of near-zero grads (tests/training/test_step.py)
BF16_TOLERANCE = 2e-2  # inductor keeps fused element-wise chains in fp32 where eager rounds each op
LORA_TARGETS = "q_proj,v_proj,o_proj,up_proj,down_proj,vision"  # fused parts left out: k_proj, gate_proj


def _config(parallel: ParallelConfig | None = None, **training) -> RunConfig:
    settings = {
        "micro_batch_size": 2, "global_batch_size": 4, "seq_length": 48, "train_iters": 2, "lr": 3e-3,
        "clip_grad": 0.5, "weight_decay": 0.1, "mock_data": True, "seed": 3, "images_per_sample": 1,
    }
    settings.update(training)
    model = llava_config(language=language_config(num_layers=4))
    return RunConfig(model=model, parallel=parallel or ParallelConfig(), training=TrainingConfig(**settings))


def _train(run: RunConfig, state: ParallelState, with_eval: bool = True) -> dict:
    """Two steps (and with `with_eval` an evaluation) of `run` at `state`'s layout: losses, grad norms,
    the evaluation loss (None without), the final weights (whole, gathered over tp) and how many
    layers are compiled."""
    config = resolve(run, state.world_size)
    t = config.training
    state.seed(t.seed)
    chunks = build_model_chunks(config, state)
    if config.lora is not None:
        # B (DoRA: magnitudes) away from the init: from B = 0 Adam's first update is +-lr wherever
        # the grad is rounding noise, which no tolerance on the weights survives.
        reset_magnitudes(chunks)
        perturb_adapters(chunks, state)
    compiled = sum(
        getattr(m, "_compiled_call_impl", None) is not None
        for chunk in chunks for m in chunk.modules() if isinstance(m, TransformerLayer)
    )
    trainer = build_trainer(config, state, chunks)
    data = SyntheticData(config, state, ResumePoint())
    losses, norms = [], []
    for iteration in range(t.train_iters):
        result = train_step(trainer, data.microbatches(iteration), iteration)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    eval_loss = evaluate(trainer, [data.batches_at(data.train, 100 * t.global_batch_size)]) if with_eval else None
    final = {
        name: gather_master(p.detach().float(), param_specs(chunk)[name].layout, state.tp_group)
        for chunk in chunks for name, p in chunk.named_parameters()
    }
    return {"losses": losses, "norms": norms, "eval": eval_loss, "final": final, "compiled": compiled}


def _errors(run: dict, reference: dict) -> dict:
    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-12)

    errors = {
        "loss": max(rel(a, b) for a, b in zip(run["losses"], reference["losses"], strict=True)),
        "norm": max(rel(a, b) for a, b in zip(run["norms"], reference["norms"], strict=True)),
        "weight": max(
            ((w - reference["final"][n]).norm() / reference["final"][n].norm().clamp(min=1e-12)).item()
            for n, w in run["final"].items()
        ),
        "compiled": run["compiled"],
        "reference_compiled": reference["compiled"],
    }
    if run["eval"] is not None:
        errors["eval"] = rel(run["eval"], reference["eval"])
    return errors


def _compiled(run: RunConfig) -> RunConfig:
    return replace(run, training=replace(run.training, torch_compile=True))


# Compilation is slow on a small CPU: the plain case runs in the quick suite, the others are slow.
@pytest.mark.parametrize("recompute", ["none", pytest.param("selective", marks=pytest.mark.slow),
                                       pytest.param("full", marks=pytest.mark.slow)])
def test_compiled_layers_train_like_eager(recompute: str) -> None:
    run = _config(recompute_granularity=recompute)
    errors = _errors(_train(_compiled(run), ParallelState.single()), _train(run, ParallelState.single()))
    # 3 vision + 4 language layers compiled, none in the eager run.
    assert (errors["compiled"], errors["reference_compiled"]) == (7, 0)
    assert errors["loss"] < TOLERANCE and errors["norm"] < TOLERANCE and errors["eval"] < TOLERANCE, errors
    assert errors["weight"] < WEIGHT_TOLERANCE, errors


@pytest.mark.slow
def test_compiled_bf16_trains_like_eager() -> None:
    run = _config(bf16=True)
    errors = _errors(_train(_compiled(run), ParallelState.single()), _train(run, ParallelState.single()))
    assert errors["compiled"] == 7
    assert errors["loss"] < BF16_TOLERANCE and errors["eval"] < BF16_TOLERANCE, errors


def test_compile_refuses_dropout() -> None:
    language = language_config(hidden_dropout=0.1)
    run = _compiled(replace(_config(), model=llava_config(language=language)))
    with pytest.raises(ConfigError, match=r"--torch-compile needs model\.language\.transformer\.hidden_dropout = 0"):
        resolve(run, 1)
    resolve(replace(run, training=replace(run.training, torch_compile=False)), 1)


def test_compile_refuses_context_parallelism_and_lora_dropout() -> None:
    run = _compiled(_config(ParallelConfig(context_parallel_size=2)))
    with pytest.raises(ConfigError, match=r"--torch-compile with --context-parallel-size 2"):
        resolve(run, 2)
    lora = _compiled(_config(lora_rank=4, lora_dropout=0.1))
    with pytest.raises(ConfigError, match=r"--torch-compile needs --lora-dropout 0"):
        resolve(lora, 1)
    resolve(_compiled(_config(lora_rank=4)), 1)


def _adapters(dora: bool) -> dict:
    """LoRA (DoRA) training settings: fused parts left out (k_proj, gate_proj), the vision tower's
    layers adapted."""
    return {"lora_rank": 4, "lora_alpha": 8.0, "lora_use_dora": dora, "lora_target_modules": [LORA_TARGETS]}


def _parallel_job() -> dict:
    """2 ranks, each case compiled against one eager process: tp=2 with sequence parallelism; the
    same with DoRA adapters (inside the layers' graphs, the row-parallel norms all-reduced there);
    pp=2 with full recompute (1F1B over 2 one-sample microbatches: the graphs of a single image) and
    LoRA adapters, which run inside each stage's tp=1 layers.

    An evaluation's no_grad graphs take about a third of a case's compile time: the tp=2 ones are
    compiled with DoRA only, whose graph holds every op and collective of the plain tp=2 layer."""
    initialize_parallel_state()
    solo = solo_state()
    tp2 = ParallelState.from_groups(tp=2, pp=1, device=torch.device("cpu"))
    tp2_sp = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    cases = {
        "tp2_sp": (_config(tp2_sp), tp2, False),
        "tp2_sp_dora": (_config(tp2_sp, **_adapters(dora=True)), tp2, True),
        "pp2_full_recompute_lora": (
            _config(ParallelConfig(pipeline_model_parallel_size=2), micro_batch_size=1, global_batch_size=2,
                    recompute_granularity="full", **_adapters(dora=False)),
            ParallelState.from_groups(tp=1, pp=2, device=torch.device("cpu")),
            True,
        ),
    }
    results = {}
    for name, (run, state, with_eval) in cases.items():
        reference = _train(replace(run, parallel=ParallelConfig()), solo, with_eval)
        results[name] = _errors(_train(_compiled(run), state, with_eval), reference)
    return results


@pytest.mark.slow
def test_compiled_tensor_sequence_and_pipeline_parallel_match_one_eager_process() -> None:
    results = run_distributed(_parallel_job, 2, timeout=900)
    for by_case in results:
        assert [name for name, errors in by_case.items() if "eval" in errors] == ["tp2_sp_dora",
                                                                                  "pp2_full_recompute_lora"]
    # Every case that differs from eager, named at once (one spawned run checks them all).
    off = [
        (rank, name, errors) for rank, by_case in enumerate(results) for name, errors in by_case.items()
        if not (errors["loss"] < TOLERANCE and errors["norm"] < TOLERANCE and errors.get("eval", 0.0) < TOLERANCE
                and errors["weight"] < WEIGHT_TOLERANCE and errors["reference_compiled"] == 0)
    ]
    assert not off, off
    # tp=2: every layer on both ranks; pp=2: the vision tower and 2 language layers on stage 0.
    assert [r["tp2_sp"]["compiled"] for r in results] == [7, 7]
    assert [r["tp2_sp_dora"]["compiled"] for r in results] == [7, 7]
    assert [r["pp2_full_recompute_lora"]["compiled"] for r in results] == [5, 2]
