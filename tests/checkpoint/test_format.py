"""The checkpoint format (megamm/checkpoint/format.py) and what is built on it.

- Publication: a save becomes visible only after its rename, and `latest` moves only after that,
  so a crash before the rename leaves `latest` on the previous checkpoint.
- The description file: a corrupt `megamm.json` is an error naming the file, for every reader.
- The fit check: every difference in one error, the same one for a training resume
  (`Checkpointer.load`) and a model-only load (`load_model_weights`).
- The model-only save: `Checkpointer.save_model` and `reshard_checkpoint.py --no-optim` write
  weights and progress only, which `load_model_weights` reads.
- The process groups: the checkpoint layer and the optimizer talk only to the state's groups, so
  one process with a state of its own saves and loads while the other process of the job never
  joins a collective.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import TensorProperties, TensorStorageMetadata

from megamm.checkpoint import dcp_io, format
from megamm.checkpoint.checkpointer import Checkpointer
from megamm.checkpoint.model_weights import load_model_weights, read_run_config_tree
from megamm.config import ParallelConfig
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.convert.writer import CheckpointReader
from megamm.data.loader import ResumePoint
from megamm.models.llava import LlavaModel
from megamm.parallel.state import ParallelState
from megamm.pipeline.chunks import build_model_chunks
from megamm.training.data import SyntheticData
from megamm.training.step import Trainer, build_trainer, train_step
from tests.distributed import run_distributed
from tests.tiny import language_config, llava_config

ROOT = Path(__file__).resolve().parents[2]


def _description(iteration: int) -> dict:
    return format.describe(iteration, format.layout_signature(1, 1, 1, 1, False), "none", {})


def _save_by_hand(save: Path, iteration: int) -> Path:
    """A published save holding one file, through the format's protocol."""
    partial = format.open_partial(save, iteration)
    (partial / "shard").write_text(f"iteration {iteration}")
    return format.publish(save, iteration, _description(iteration))


# ---- publication ---------------------------------------------------------------------------------


def test_a_save_is_visible_only_once_published(tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    partial = format.open_partial(save, 3)
    assert format.resolve(save) is None  # nothing to load while the first save is written
    final = format.publish(save, 3, _description(3))
    assert final == save / "iter_0000003" and not partial.exists()
    assert (save / format.LATEST).read_text().strip() == "iter_0000003"
    assert format.resolve(save) == final and format.read_description(final)["iteration"] == 3


def test_a_crash_before_the_rename_leaves_latest_on_the_previous_checkpoint(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    save = tmp_path / "ckpt"
    previous = _save_by_hand(save, 1)
    partial = format.open_partial(save, 2)
    (partial / "shard").write_text("iteration 2")
    rename = format.os.replace

    def crash_on_the_checkpoint_rename(source, target) -> None:
        if Path(source) == partial:
            raise OSError("killed before the rename")
        rename(source, target)

    monkeypatch.setattr(format.os, "replace", crash_on_the_checkpoint_rename)
    with pytest.raises(OSError, match="killed before the rename"):
        format.publish(save, 2, _description(2))
    monkeypatch.undo()
    assert (save / format.LATEST).read_text().strip() == "iter_0000001"
    assert format.resolve(save) == previous
    assert not format.iteration_dir(save, 2).exists()
    # The unfinished save holds its description already, and is still never taken for a checkpoint.
    assert (partial / format.DESCRIPTION).exists()
    with pytest.raises(ValueError, match="unfinished save"):
        format.resolve(partial)


def test_keep_last_removes_older_and_unfinished_saves(tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    for iteration in (1, 2):
        _save_by_hand(save, iteration)
    format.open_partial(save, 5)  # a save that crashed
    format.open_partial(save, 3)
    (format.partial_dir(save, 3) / "shard").write_text("iteration 3")
    format.publish(save, 3, _description(3), keep_last=2)
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000002", "iter_0000003", "latest"]


# ---- the description file ------------------------------------------------------------------------

CORRUPT = {
    "not json": "{\"format\": \"megamm-dcp-1\", \"iteration\": ",
    "not an object": "[1, 2]",
    "another format": json.dumps({"format": "megatron", "iteration": 4}),
    "no iteration": json.dumps({"format": format.FORMAT, "iteration": "four"}),
    "layout not an object": json.dumps({"format": format.FORMAT, "iteration": 4, "layout": [1, 2]}),
}


@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_a_corrupt_description_is_an_error_naming_the_file(tmp_path: Path, content: str) -> None:
    checkpoint = _save_by_hand(tmp_path / "ckpt", 4)
    path = checkpoint / format.DESCRIPTION
    path.write_text(content)
    with pytest.raises(format.CheckpointFormatError, match=str(path)):
        format.read_description(tmp_path / "ckpt" / "iter_0000004")
    # Every reader goes through it: generation's config reader and the converter's reader.
    with pytest.raises(format.CheckpointFormatError, match=str(path)):
        read_run_config_tree(tmp_path / "ckpt")
    with pytest.raises(format.CheckpointFormatError, match=str(path)):
        CheckpointReader(tmp_path / "ckpt")


def test_checkpoint_info_reports_a_corrupt_description(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = _save_by_hand(tmp_path / "ckpt", 4)
    (checkpoint / format.DESCRIPTION).write_text("{")
    spec = importlib.util.spec_from_file_location("checkpoint_info", ROOT / "tools" / "checkpoint_info.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(checkpoint)]) == 2
    assert str(checkpoint / format.DESCRIPTION) in capsys.readouterr().err


# ---- the fit check -------------------------------------------------------------------------------


def _saved(shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorStorageMetadata]:
    return {key: TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(shape), [])
            for key, shape in shapes.items()}


def test_check_fit_lists_every_difference_at_once(tmp_path: Path) -> None:
    wanted = {"model/a.weight": (2, 3), "model/b.weight": (4,), "optim/master/a.weight": (2, 3),
              "rng/rank0/cpu": (5,)}
    saved = _saved({"model/a.weight": (2, 4), "model/c.weight": (1,), "optim/master/c.weight": (1, 1)})
    with pytest.raises(format.CheckpointMismatchError) as caught:
        format.check_fit(tmp_path, wanted, saved, optional=(format.RNG,),
                         missing_hints={format.OPTIMIZER: "pass --no-load-optim"})
    lines = str(caught.value).splitlines()
    assert lines[0] == f"checkpoint {tmp_path} does not fit this model:"
    assert lines[1:] == [
        "  - missing in the checkpoint (pass --no-load-optim): model/b.weight, optim/master/a.weight",
        "  - in the checkpoint but not in the model: model/c.weight",
        "  - model/a.weight: checkpoint has shape [2, 4], the model needs [2, 3]",
    ]


def test_check_fit_accepts_a_projector_absent_as_a_whole_only(tmp_path: Path) -> None:
    wanted = {"model/vision.w": (2,), "model/projector.fc1.weight": (3, 2), "model/projector.fc1.bias": (3,),
              "optim/master/projector.fc1.weight": (3, 2)}
    towers = _saved({"model/vision.w": (2,)})
    fit = format.check_fit(tmp_path, wanted, towers, fresh_allowed=("projector.",))
    assert fit.fresh == ("projector.",) and fit.keys == {"model/vision.w"}
    half = _saved({"model/vision.w": (2,), "model/projector.fc1.weight": (3, 2)})
    with pytest.raises(format.CheckpointMismatchError,
                       match=r"missing in the checkpoint: model/projector.fc1.bias, optim/master/projector"):
        format.check_fit(tmp_path, wanted, half, fresh_allowed=("projector.",))
    with pytest.raises(format.CheckpointMismatchError, match="model/projector.fc1.bias, model/projector.fc1.weight"):
        format.check_fit(tmp_path, wanted, towers)


# ---- one process: a real model, the Checkpointer and load_model_weights --------------------------


def _run_config(**language) -> RunConfig:
    model = llava_config(language=language_config(**language))
    return RunConfig(model=model, parallel=ParallelConfig(),
                     training=TrainingConfig(micro_batch_size=1, global_batch_size=2, seq_length=48, train_iters=2,
                                             mock_data=True, seed=3, images_per_sample=2,
                                             use_distributed_optimizer=True))


def _trainer(run: RunConfig, state: ParallelState, init_seed: int | None = None) -> Trainer:
    config = resolve(run, state.world_size)
    state.seed(config.training.seed)
    chunks = build_model_chunks(config, state)
    if init_seed is not None:
        for chunk in chunks:
            chunk.initialize(init_seed)
    return build_trainer(config, state, chunks)


def _checkpointer(trainer: Trainer, save: Path | None = None, optimizer: bool = True) -> Checkpointer:
    return Checkpointer(trainer.state, trainer.config, trainer.chunks, trainer.optimizer if optimizer else None,
                        trainer.scaler, save_dir=save, log=lambda _: None)


def _trained(config: RunConfig, state: ParallelState) -> Trainer:
    trainer = _trainer(config, state)
    train_step(trainer, SyntheticData(trainer.config, state, ResumePoint()).microbatches(0), 0)
    return trainer


def _weights(modules) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for module in modules for name, p in module.named_parameters()}


def _fresh_model(trainer: Trainer, state: ParallelState) -> LlavaModel:
    model = LlavaModel(trainer.model.config, state)
    model.initialize(999)
    return model


def test_save_model_writes_weights_and_progress_that_load_model_weights_reads(tmp_path: Path) -> None:
    state = ParallelState.single()
    config = _run_config()
    trainer = _trained(config, state)
    _checkpointer(trainer, tmp_path / "ckpt").save_model(1, 2)
    checkpoint = format.resolve(tmp_path / "ckpt")
    keys = set(dcp_io.saved_tensors(checkpoint))
    assert {format.ITERATION, format.CONSUMED_SAMPLES} <= keys
    assert {k[len(format.MODEL):] for k in keys if k.startswith(format.MODEL)} == set(_weights(trainer.chunks))
    assert not [k for k in keys if k.startswith((format.OPTIMIZER, format.RNG))]
    assert format.read_description(checkpoint)["optimizer"] == "none"

    model = _fresh_model(trainer, state)
    load_model_weights(model, tmp_path / "ckpt", state)
    expected = _weights(trainer.chunks)
    assert all(torch.equal(p, expected[name]) for name, p in model.named_parameters())

    # A resume from it needs --no-load-optim, and then starts where the save left.
    resumed = _trainer(config, state, init_seed=7)
    with pytest.raises(format.CheckpointMismatchError, match="pass --no-load-optim"):
        _checkpointer(resumed).load(tmp_path / "ckpt")
    progress = _checkpointer(resumed).load(tmp_path / "ckpt", load_optim=False)
    assert (progress.iteration, progress.consumed_samples) == (1, 2)
    assert all(torch.equal(p, expected[name]) for name, p in resumed.model.named_parameters())


def test_one_fit_check_for_the_training_resume_and_the_model_only_load(tmp_path: Path) -> None:
    """A model with other shapes and layers gets the same error, listing every difference, from
    `Checkpointer.load` and from `load_model_weights`."""
    state = ParallelState.single()
    trainer = _trained(_run_config(), state)
    _checkpointer(trainer, tmp_path / "ckpt").save(1, 2)
    other = _trainer(_run_config(num_layers=3, ffn_hidden_size=128), state)
    with pytest.raises(format.CheckpointMismatchError) as resume:
        _checkpointer(other).load(tmp_path / "ckpt", load_optim=False, load_rng=False)
    with pytest.raises(format.CheckpointMismatchError) as model_only:
        load_model_weights(other.chunks, tmp_path / "ckpt", state)
    assert str(resume.value) == str(model_only.value)
    problems = str(resume.value).splitlines()[1:]
    assert len(problems) == 1 + 2 * 2  # the missing layer, then fc1 and fc2 of the two common layers
    assert problems[0].startswith("  - missing in the checkpoint: model/language.decoder.layers.2.")
    assert "  - model/language.decoder.layers.1.mlp.fc1.weight: checkpoint has shape [192, 64], " \
           "the model needs [256, 64]" in problems
    fewer = _trainer(_run_config(num_layers=1), state)
    with pytest.raises(format.CheckpointMismatchError,
                       match="in the checkpoint but not in the model: model/language.decoder.layers.1."):
        load_model_weights(fewer.chunks, tmp_path / "ckpt", state)


@pytest.mark.slow
def test_reshard_tool_no_optim_writes_a_model_only_checkpoint(tmp_path: Path) -> None:
    state = ParallelState.single()
    trainer = _trained(_run_config(), state)
    _checkpointer(trainer, tmp_path / "source").save(1, 2)
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "reshard_checkpoint.py"), "--load", str(tmp_path / "source"),
         "--save", str(tmp_path / "model-only"), "--tensor-model-parallel-size", "1",
         "--pipeline-model-parallel-size", "1", "--no-optim"],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    checkpoint = format.resolve(tmp_path / "model-only")
    description = format.read_description(checkpoint)
    assert description["optimizer"] == "none"
    assert description["resharded_from"] == str(tmp_path / "source" / "iter_0000001")
    keys = set(dcp_io.saved_tensors(checkpoint))
    assert not [k for k in keys if k.startswith((format.OPTIMIZER, format.RNG))]
    model = _fresh_model(trainer, state)
    load_model_weights(model, checkpoint, state)
    expected = _weights(trainer.chunks)
    assert all(torch.equal(p, expected[name]) for name, p in model.named_parameters())


# ---- the process groups --------------------------------------------------------------------------


def _own_state_job(directory: str) -> dict:
    """Rank 1 trains, saves (sync and async), resumes and loads model weights with a state of its own;
    rank 0 waits for a file, joining no collective. A collective on the default group would leave
    rank 1 waiting for rank 0 until the test's timeout."""
    import torch.distributed as dist

    from megamm.parallel.state import initialize_parallel_state
    from tests.distributed import solo_state

    full = initialize_parallel_state()
    layout = {"rank": full.rank, "global_rank": dist.get_rank(), "world": dist.get_world_size(full.world_group),
              "checkpoint_backend": dist.get_backend(full.checkpoint_group),
              "checkpoint_size": dist.get_world_size(full.checkpoint_group)}
    state = solo_state()
    done = Path(directory) / "done"
    if dist.get_rank() == 0:
        deadline = time.monotonic() + 240
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return layout
    config = _run_config()
    trainer = _trained(config, state)
    for async_save in (False, True):
        saver = Checkpointer(state, trainer.config, trainer.chunks, trainer.optimizer, trainer.scaler,
                             save_dir=Path(directory) / f"async-{async_save}", async_save=async_save,
                             log=lambda _: None)
        saver.save(1, 2)
        saver.wait()
    resumed = _trainer(config, state, init_seed=5)
    progress = _checkpointer(resumed).load(Path(directory) / "async-True")
    train_step(resumed, SyntheticData(resumed.config, state, ResumePoint()).microbatches(1), 1)
    model = _fresh_model(trainer, state)
    load_model_weights(model, Path(directory) / "async-False", state)
    expected = _weights(trainer.chunks)
    done.write_text("done")
    return {**layout, "iteration": progress.iteration,
            "weights_equal": all(torch.equal(p, expected[n]) for n, p in model.named_parameters())}


@pytest.mark.slow
def test_the_checkpoint_layer_talks_only_to_the_states_groups(tmp_path: Path) -> None:
    idle, active = run_distributed(_own_state_job, 2, str(tmp_path), timeout=150)
    for rank, result in enumerate((idle, active)):
        assert result["rank"] == result["global_rank"] == rank
        assert result["world"] == result["checkpoint_size"] == 2 and result["checkpoint_backend"] == "gloo"
    assert active["iteration"] == 1 and active["weights_equal"]
    assert format.resolve(tmp_path / "async-True").name == "iter_0000001"


def test_same_layout_reads_a_description_without_cp_as_cp_1() -> None:
    """Generator states are restored only at the same layout; descriptions written before cp was
    recorded were saved at cp = 1."""
    current = format.layout_signature(2, 1, 2, 1, True)
    older = {key: value for key, value in current.items() if key != "cp"}
    assert format.same_layout(older, current)
    assert format.same_layout(current, current)
    assert not format.same_layout(older, format.layout_signature(2, 1, 1, 1, True, cp=2))
    assert not format.same_layout(None, current)
