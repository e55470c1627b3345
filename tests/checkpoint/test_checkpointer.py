"""Sharded checkpoints: resharding to other tp/pp/dp/cp layouts (plain and distributed optimizer),
exact resume (sync and async saves, with dropout), partial loads and helpful mismatch errors.

Every comparison loads into a model initialized from a different seed, so agreement can only come
from the checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megamm.checkpoint.checkpointer import Checkpointer
from megamm.checkpoint.format import CheckpointMismatchError
from megamm.config import ParallelConfig
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.data.loader import ResumePoint
from megamm.parallel.params import param_specs
from megamm.parallel.sharding import gather_master
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.pipeline.chunks import build_model_chunks
from megamm.training.data import SyntheticData
from megamm.training.step import build_trainer, evaluate, train_step
from tests.distributed import run_distributed
from tests.tiny import language_config, llava_config, vision_config

TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 5e-5  # Adam amplifies rounding of near-zero grads (see test_training_parity)
EVAL_BATCH = 100


def _config(tp: int, pp: int, dropout: float = 0.0, tied: bool = False, **training) -> RunConfig:
    language = replace(language_config(num_layers=8, hidden_dropout=dropout, attention_dropout=dropout),
                       tie_word_embeddings=tied)
    vision = replace(vision_config(hidden_dropout=dropout, attention_dropout=dropout))
    settings = {
        "micro_batch_size": 1, "global_batch_size": 8, "seq_length": 48, "train_iters": 4, "lr": 3e-3,
        "clip_grad": 0.5, "weight_decay": 0.1, "mock_data": True, "seed": 3, "images_per_sample": 2,
    }
    settings.update(training)
    return RunConfig(
        model=llava_config(language=language, vision=vision),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                sequence_parallel=tp > 1),
        training=TrainingConfig(**settings),
    )


class Session:
    """A model, trainer and checkpointer at one layout; `init_seed` perturbs the initialization."""

    def __init__(self, run: RunConfig, state: ParallelState, save: Path | None = None,
                 init_seed: int | None = None, async_save: bool = False) -> None:
        config = resolve(run, state.world_size)
        self.config, self.state = config, state
        state.seed(config.training.seed)
        self.chunks = build_model_chunks(config, state)
        if init_seed is not None:
            for chunk in self.chunks:
                chunk.initialize(init_seed)
        self.trainer = build_trainer(config, state, self.chunks)
        self.checkpointer = Checkpointer(state, config, self.chunks, self.trainer.optimizer,
                                         self.trainer.scaler, save_dir=save, async_save=async_save,
                                         log=lambda _: None)
        self.data = SyntheticData(config, state, ResumePoint())

    def step(self, iteration: int) -> tuple[float, float]:
        result = train_step(self.trainer, self.data.microbatches(iteration), iteration)
        return result.loss, result.grad_norm

    def eval_loss(self) -> float:
        return evaluate(self.trainer, [self.data.batches_at(self.data.train, EVAL_BATCH * self.config.training.global_batch_size)])

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: gather_master(p.detach(), param_specs(chunk)[name].layout, self.state.tp_group).clone()
                for chunk in self.chunks for name, p in chunk.named_parameters()}


def _figures(session: Session, iteration: int) -> dict:
    eval_loss = session.eval_loss()
    loss, norm = session.step(iteration)
    return {"eval": eval_loss, "loss": loss, "norm": norm, "weights": session.weights()}


def _reshard_job(directory: str, source: tuple[int, int], targets: list[tuple[int, int]], distributed: bool,
                 target_distributed: list[bool]) -> dict:
    initialize_parallel_state()
    layouts = {source, *targets}
    states = {layout: ParallelState.from_groups(tp=layout[0], pp=layout[1], device=torch.device("cpu"))
              for layout in sorted(layouts)}
    # The distributed-optimizer checkpoint also has tied embeddings (two stage copies of one table).
    tied = distributed
    saved = Session(_config(*source, tied=tied, use_distributed_optimizer=distributed), states[source],
                    Path(directory))
    for iteration in range(2):
        saved.step(iteration)
    saved.checkpointer.save(2, 16)
    results = {"source": _figures(saved, 2)}
    for target, target_dist in zip(targets, target_distributed):
        config = _config(*target, tied=tied, use_distributed_optimizer=target_dist)
        session = Session(config, states[target], init_seed=999)
        progress = session.checkpointer.load(directory)
        assert progress is not None and progress.iteration == 2 and progress.consumed_samples == 16
        results[f"tp{target[0]}_pp{target[1]}_{'dist' if target_dist else 'plain'}"] = _figures(session, 2)
    return results


def _context_parallel_reshard_job(directory: str) -> dict:
    """Saved at cp=2 x dp=2 with the distributed optimizer (its shards span dp x cp): loads at cp=1
    (dp=4) and cp=4 (dp=1) with the distributed optimizer, and at cp=1 into the plain one."""
    initialize_parallel_state()
    states = {cp: ParallelState.from_groups(tp=1, pp=1, device=torch.device("cpu"), cp=cp) for cp in (1, 2, 4)}

    def config(cp: int, distributed: bool) -> RunConfig:
        run = _config(1, 1, use_distributed_optimizer=distributed)
        return replace(run, parallel=replace(run.parallel, context_parallel_size=cp))

    saved = Session(config(2, True), states[2], Path(directory))
    for iteration in range(2):
        saved.step(iteration)
    saved.checkpointer.save(2, 16)
    results = {"source": _figures(saved, 2)}
    for cp, distributed in ((1, True), (4, True), (1, False)):
        session = Session(config(cp, distributed), states[cp], init_seed=999)
        progress = session.checkpointer.load(directory)
        assert progress is not None and progress.iteration == 2
        results[f"cp{cp}_{'dist' if distributed else 'plain'}"] = _figures(session, 2)
    return results


def _merge(per_rank: list[dict], key: str) -> dict:
    merged = dict(per_rank[0][key])
    for results in per_rank[1:]:
        for name, value in results[key]["weights"].items():
            merged["weights"].setdefault(name, value)
    return merged


def _compare(per_rank: list[dict], case: str) -> None:
    source, target = _merge(per_rank, "source"), _merge(per_rank, case)
    for field in ("eval", "loss", "norm"):
        error = abs(target[field] - source[field]) / abs(source[field])
        assert error < TOLERANCE, f"{case}: {field} {target[field]} vs {source[field]}"
    assert set(target["weights"]) == set(source["weights"])
    for name, expected in source["weights"].items():
        error = ((target["weights"][name] - expected).norm() / expected.norm().clamp(min=1e-12)).item()
        assert error < WEIGHT_TOLERANCE, f"{case}: {name} relative error {error}"


@pytest.fixture(scope="module")
def plain_reshard(tmp_path_factory) -> list[dict]:
    directory = tmp_path_factory.mktemp("plain") / "ckpt"
    return run_distributed(_reshard_job, 4, str(directory), (2, 2), [(1, 1), (4, 1), (1, 4)], False,
                           [False, False, False], timeout=600)


@pytest.fixture(scope="module")
def distributed_reshard(tmp_path_factory) -> list[dict]:
    directory = tmp_path_factory.mktemp("dist") / "ckpt"
    return run_distributed(_reshard_job, 4, str(directory), (1, 2), [(1, 4), (1, 1), (2, 2)], True,
                           [True, True, False], timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tp1_pp1_plain", "tp4_pp1_plain", "tp1_pp4_plain"])
def test_tp2_pp2_checkpoint_loads_at_other_layouts(plain_reshard: list[dict], case: str) -> None:
    """Saved at tp=2 x pp=2: same evaluation loss, same next step and same updated weights elsewhere."""
    _compare(plain_reshard, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tp1_pp4_dist", "tp1_pp1_dist", "tp2_pp2_plain"])
def test_distributed_optimizer_checkpoint_reshards(distributed_reshard: list[dict], case: str) -> None:
    """Saved with the distributed optimizer at dp=2 (pp=2, tied embeddings): loads at dp=1 and dp=4,
    and into the plain optimizer, with the same next step."""
    _compare(distributed_reshard, case)


@pytest.fixture(scope="module")
def context_parallel_reshard(tmp_path_factory) -> list[dict]:
    directory = tmp_path_factory.mktemp("cp") / "ckpt"
    return run_distributed(_context_parallel_reshard_job, 4, str(directory), timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["cp1_dist", "cp4_dist", "cp1_plain"])
def test_context_parallel_checkpoint_loads_at_other_cp(context_parallel_reshard: list[dict], case: str) -> None:
    """Saved at cp=2: same evaluation loss, same next step and same updated weights at cp=1 and cp=4."""
    _compare(context_parallel_reshard, case)


def _resume_job(directory: str, async_save: bool) -> dict:
    initialize_parallel_state()
    state = ParallelState.from_groups(tp=2, pp=1, device=torch.device("cpu"))
    config = _config(2, 1, dropout=0.1, use_distributed_optimizer=True, overlap_grad_reduce=True)
    first = Session(config, state, Path(directory), async_save=async_save)
    straight = []
    for iteration in range(4):
        straight.append(first.step(iteration)[0])
        if iteration == 1:
            first.checkpointer.save(2, 16)
    first.checkpointer.wait()
    second = Session(config, state, init_seed=999)
    progress = second.checkpointer.load(directory)
    resumed = [second.step(iteration)[0] for iteration in range(progress.iteration, 4)]
    return {"straight": straight, "resumed": resumed}


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_resume_is_bit_exact(tmp_path: Path, async_save: bool) -> None:
    """tp=2 (sp) x dp=2, distributed optimizer, dropout on: train 4 steps saving at 2, versus load
    at 2 and train to 4: the same losses bit for bit."""
    for result in run_distributed(_resume_job, 4, str(tmp_path / "ckpt"), async_save):
        assert result["resumed"] == result["straight"][2:]
        assert len(set(result["straight"])) == 4


def _partial_job(directory: str) -> dict:
    from torch.distributed.checkpoint import FileSystemWriter

    from megamm.checkpoint import dcp_io, format
    from megamm.checkpoint.blocks import BlockSavePlanner

    initialize_parallel_state()
    state = ParallelState.from_groups(tp=2, pp=1, device=torch.device("cpu"))
    config = _config(2, 1)
    towers = Session(config, state, Path(directory))
    # A checkpoint of the two towers only, as a stage-1 start from separately converted towers has.
    model_only = {k: v for k, v in towers.checkpointer.model_state().items() if "projector." not in k}
    model_only.update(towers.checkpointer.progress_state(0, 0))
    group = state.checkpoint_group
    if state.rank == 0:
        format.open_partial(directory, 0)
    torch.distributed.barrier(group=group)
    dcp_io.save(model_only, FileSystemWriter(format.partial_dir(directory, 0)), BlockSavePlanner(), group)
    torch.distributed.barrier(group=group)
    if state.rank == 0:
        format.publish(directory, 0, format.describe(0, {}, "none", {}))
    torch.distributed.barrier(group=group)
    results = {}

    fresh = Session(config, state, init_seed=999)
    projector_before = {n: p.clone() for n, p in fresh.chunks[0].projector.named_parameters()}
    try:
        fresh.checkpointer.load(directory)
    except CheckpointMismatchError as error:
        results["without_no_load_optim"] = str(error)
    fresh.checkpointer.load(directory, load_optim=False)
    results["projector_kept"] = all(torch.equal(p, projector_before[n])
                                    for n, p in fresh.chunks[0].projector.named_parameters())
    expected, got = towers.weights(), fresh.weights()
    results["towers_loaded"] = all(torch.equal(got[n], expected[n]) for n in expected if "projector." not in n)

    wider = replace(config, model=replace(config.model, language=replace(
        config.model.language, transformer=replace(config.model.language.transformer, ffn_hidden_size=128, num_layers=6))))
    try:
        Session(wider, state, init_seed=5).checkpointer.load(directory, load_optim=False)
    except CheckpointMismatchError as error:
        results["mismatch"] = str(error)
    return results


@pytest.mark.slow
def test_partial_loads_and_mismatch_errors(tmp_path: Path) -> None:
    for result in run_distributed(_partial_job, 2, str(tmp_path / "ckpt")):
        assert "pass --no-load-optim" in result["without_no_load_optim"]
        assert result["projector_kept"] and result["towers_loaded"]
        mismatch = result["mismatch"]
        assert "language.decoder.layers.0.mlp.fc1.weight: checkpoint has shape [192, 64], the model needs [256, 64]" \
            in mismatch, mismatch
        assert "in the checkpoint but not in the model: model/language.decoder.layers.6" in mismatch
