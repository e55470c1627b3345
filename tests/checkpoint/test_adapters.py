"""LoRA checkpoints: a base saved at one layout, adapters trained on it at tp=2 and saved alone,
resumed at pp=2 on the same base, and the run continues exactly; wrong pairings are refused.
Adapters (DoRA: row-parallel magnitudes replicated, column-parallel ones split) load at any layout
with the same logits: saved at tp=2 (with SP), loaded at tp=1 and pp=2; saved at pp=2 after two more
steps there, loaded at tp=2 and tp=1.

Every model is built from a different seed than the one it loads, so agreement can only come from
the checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megamm.checkpoint import format
from megamm.checkpoint.adapters import load_pretrained
from megamm.checkpoint.checkpointer import Checkpointer
from megamm.checkpoint.format import CheckpointMismatchError
from megamm.checkpoint.model_weights import load_model_weights
from megamm.config import ParallelConfig
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.data.loader import ResumePoint
from megamm.data.synthetic import SyntheticMultimodalDataset, collate
from megamm.inference.logits import full_vocab_logits
from megamm.models.llava import LlavaModel
from megamm.models.lora import is_adapter_parameter, reset_magnitudes
from megamm.parallel.params import param_specs
from megamm.parallel.sharding import gather_master
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.pipeline.chunks import build_model_chunks
from megamm.training.data import SyntheticData
from megamm.training.preflight import file_problems
from megamm.training.step import build_trainer, train_step
from tests.distributed import run_distributed, solo_state
from tests.tiny import llava_config

TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 5e-5


def _run(tp: int, pp: int, lora: bool = True, **training) -> RunConfig:
    settings = {"micro_batch_size": 2, "global_batch_size": 8, "seq_length": 48, "train_iters": 4, "lr": 1e-2,
                "mock_data": True, "seed": 1, "images_per_sample": 2}
    if lora:
        settings.update(lora_rank=4, lora_alpha=8.0, lora_target_modules=["q_proj,k_proj,v_proj,o_proj,up_proj"],
                        lora_use_dora=True, freeze_ViT=True)
    settings.update(training)
    return RunConfig(model=llava_config(), training=TrainingConfig(**settings),
                     parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             sequence_parallel=tp > 1))


class Run:
    """Chunks initialized from `init_seed` (then the base loaded from --pretrained-checkpoint),
    trainer and checkpointer at one layout."""

    def __init__(self, run: RunConfig, state: ParallelState, init_seed: int, save: Path | None = None) -> None:
        self.config, self.state = resolve(run, state.world_size), state
        state.seed(run.training.seed)
        self.chunks = build_model_chunks(self.config, state)
        for chunk in self.chunks:
            chunk.initialize(init_seed)
        if run.training.pretrained_checkpoint:
            load_pretrained(self.chunks, run.training.pretrained_checkpoint, state, log=lambda _: None)
        reset_magnitudes(self.chunks)
        self.trainer = build_trainer(self.config, state, self.chunks)
        self.checkpointer = Checkpointer(state, self.config, self.chunks, self.trainer.optimizer, save_dir=save,
                                         log=lambda _: None)
        self.data = SyntheticData(self.config, state, ResumePoint())
        t = self.config.training
        self.data_set = SyntheticMultimodalDataset(self.config.model, t.seq_length, t.seed + 1, t.images_per_sample)

    def step(self, iteration: int) -> float:
        return train_step(self.trainer, self.data.microbatches(iteration), iteration).loss

    @torch.no_grad()
    def logits(self, batch: dict) -> torch.Tensor:
        """`[s, b, vocab]` logits of `batch` in eval mode, on every rank (pp: the first stage sends
        its hidden states to the last, which broadcasts the logits)."""
        (chunk,) = self.chunks
        state, vocab = self.state, self.config.model.language.vocab_size
        chunk.eval()
        inputs = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"],
                  "images_per_sample": batch["images_per_sample"]}
        if state.pp_size == 1:
            logits = full_vocab_logits(chunk(**inputs, return_logits=True)["logits"], state, vocab)
        else:
            seq, rows = batch["input_ids"].shape[1], batch["input_ids"].shape[0]
            logits = torch.empty(seq, rows, vocab)
            if state.is_first_stage:
                hidden = chunk(**inputs)["hidden_states"].contiguous()
                dist.send(hidden, dst=state.pp_ranks[-1], group=state.pp_group)
            else:
                hidden = torch.empty(seq, rows, self.config.model.language.transformer.hidden_size)
                dist.recv(hidden, src=state.pp_ranks[0], group=state.pp_group)
                logits = full_vocab_logits(chunk(decoder_input=hidden, return_logits=True)["logits"], state,
                                           vocab).contiguous()
            dist.broadcast(logits, src=state.pp_ranks[-1], group=state.pp_group)
        chunk.train()
        return logits

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: gather_master(p.detach(), param_specs(chunk)[name].layout, self.state.tp_group).clone()
                for chunk in self.chunks for name, p in chunk.named_parameters()}


def _job(directory: str) -> dict:
    initialize_parallel_state()
    tp2 = ParallelState.from_groups(tp=2, pp=1, device=torch.device("cpu"))
    pp2 = ParallelState.from_groups(tp=1, pp=2, device=torch.device("cpu"))
    solo = solo_state()
    base_dir, adapter_dir = Path(directory) / "base", Path(directory) / "lora"
    pp2_dir = Path(directory) / "lora-pp2"
    # The base: a full-training checkpoint (model and optimizer) saved at pp=2.
    base = Run(_run(1, 2, lora=False), pp2, init_seed=1, save=base_dir)
    base.checkpointer.save(0, 0)
    base_weights = base.weights()
    # LoRA on it at tp=2 (another init seed: the base must come from the checkpoint), 2 steps, saved.
    lora = Run(_run(2, 1, pretrained_checkpoint=str(base_dir)), tp2, init_seed=2, save=adapter_dir)
    loaded_base = {n: w for n, w in lora.weights().items() if not is_adapter_parameter(n)}
    for iteration in range(2):
        lora.step(iteration)
    lora.checkpointer.save(2, 16)
    batch = collate([lora.data_set[i] for i in range(2)])
    logits = {"tp2 (saved)": lora.logits(batch)}
    saved_weights = {n: w for n, w in lora.weights().items() if f"{format.MODEL}{n}" in _saved_model_keys(
        format.resolve(adapter_dir))}
    continued = [lora.step(iteration) for iteration in (2, 3)]
    # Resumed at pp=2 from the adapters on the same base, from yet another init.
    resumed = Run(_run(1, 2, pretrained_checkpoint=str(base_dir)), pp2, init_seed=3, save=pp2_dir)
    progress = resumed.checkpointer.load(adapter_dir)
    after_load = resumed.weights()
    logits["pp2 (loaded)"] = resumed.logits(batch)
    at_tp1 = Run(_run(1, 1, pretrained_checkpoint=str(base_dir)), solo, init_seed=4)
    at_tp1.checkpointer.load(adapter_dir)
    logits["tp1 (loaded)"] = at_tp1.logits(batch)
    resumed_losses = [resumed.step(iteration) for iteration in (2, 3)]
    # The reverse: saved at pp=2, loaded at tp=2 (with SP) and at tp=1.
    resumed.checkpointer.save(4, 32)
    reverse = {"pp2 (saved)": resumed.logits(batch)}
    for name, run, state in (("tp2 (loaded)", _run(2, 1, pretrained_checkpoint=str(base_dir)), tp2),
                             ("tp1 (loaded)", _run(1, 1, pretrained_checkpoint=str(base_dir)), solo)):
        loaded = Run(run, state, init_seed=5)
        loaded.checkpointer.load(pp2_dir)
        reverse[name] = loaded.logits(batch)
    path = format.resolve(adapter_dir)
    try:
        load_pretrained(resumed.chunks, adapter_dir, pp2, log=lambda _: None)
        wrong_base = ""
    except CheckpointMismatchError as error:
        wrong_base = str(error)
    return {
        "base": base_weights, "loaded_base": loaded_base, "continued": continued, "resumed": resumed_losses,
        "iteration": progress.iteration, "after_load": after_load, "saved_at_2": _saved_model_keys(path),
        "description": format.read_description(path), "wrong_base": wrong_base,
        "adapter_bytes": _bytes(path), "base_bytes": _bytes(format.resolve(base_dir)),
        "saved_weights": saved_weights, "logits": logits, "reverse_logits": reverse,
    }


def _saved_model_keys(path: Path) -> list[str]:
    from megamm.checkpoint import dcp_io

    metadata = dcp_io.reader(path, verify=False).read_metadata().state_dict_metadata
    return sorted(key for key in metadata if key.startswith(format.MODEL))


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".distcp")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    directory = tmp_path_factory.mktemp("lora_checkpoints")
    return run_distributed(_job, 2, str(directory)), directory


def _joined(per_rank: list[dict], key: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for r in per_rank:
        out.update(r[key])
    return out


@pytest.mark.slow
def test_adapters_save_alone_and_resume_on_their_base_at_another_layout(results) -> None:
    per_rank, _ = results
    first = per_rank[0]
    base = _joined(per_rank, "base")
    # The base loads at tp=2 from its pp=2 save, exactly.
    for name, weight in first["loaded_base"].items():
        assert torch.equal(weight, base[name]), name
    # The adapter checkpoint holds the trainable tensors only: adapters and the untargeted projector
    # (the vision tower is frozen by --freeze-ViT).
    saved = {key[len(format.MODEL):] for key in first["saved_at_2"]}
    assert saved and all(is_adapter_parameter(n) or n.startswith("projector.") for n in saved)
    assert any(n.startswith("projector.") for n in saved) and any(is_adapter_parameter(n) for n in saved)
    # Small: adapters + projector with their Adam state, against the base run's weights and Adam state
    # (a third here, with rank 4 on a 64-wide model; the fraction shrinks with the width).
    assert first["adapter_bytes"] < 0.5 * first["base_bytes"], (first["adapter_bytes"], first["base_bytes"])
    assert first["description"]["contents"] == "trainable"
    assert first["description"]["pretrained"].endswith("base")
    # Resume: progress, and the next two losses equal to the uninterrupted run's.
    assert first["iteration"] == 2
    for rank, r in enumerate(per_rank):
        for a, b in zip(r["resumed"], first["continued"]):
            assert abs(a - b) / abs(b) < TOLERANCE, f"rank {rank}: resumed loss {a} vs {b}"
    # What the resumed run loaded is what the LoRA run had at its save (trained tensors included).
    resumed = _joined(per_rank, "after_load")
    for name, weight in _joined(per_rank, "saved_weights").items():
        assert torch.equal(resumed[name], weight), name
    assert "a LoRA run's checkpoint" in first["wrong_base"] and "--pretrained-checkpoint" in first["wrong_base"]


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["logits", "reverse_logits"])
def test_adapters_load_at_any_layout_with_the_same_logits(results, direction: str) -> None:
    per_rank, _ = results
    (saved_name,) = [name for name in per_rank[0][direction] if "saved" in name]
    saved = per_rank[0][direction][saved_name]
    assert direction == "logits" or not torch.allclose(saved, per_rank[0]["logits"][saved_name.replace(
        "pp2", "tp2")], atol=1e-3), "the pp=2 steps must change the adapters for the reverse load to mean something"
    for rank, r in enumerate(per_rank):
        for name, logits in r[direction].items():
            error = ((logits - saved).abs().max() / saved.abs().max()).item()
            assert error < TOLERANCE, f"rank {rank}: {name} vs {saved_name}: relative logit error {error:.2e}"


@pytest.mark.slow
def test_a_lora_run_refuses_mismatched_checkpoints_up_front(results) -> None:
    _, directory = results
    base, adapters = str(directory / "base"), str(directory / "lora")
    problems = file_problems(_run(1, 1, load=base))
    assert any("a whole model, not a LoRA run's checkpoint" in p for p in problems), problems
    problems = file_problems(_run(1, 1, lora=False, load=adapters))
    assert any("merge it into its base first" in p for p in problems), problems
    problems = file_problems(_run(1, 1, pretrained_checkpoint=adapters))
    assert any("resume it with --load" in p for p in problems), problems
    assert file_problems(_run(1, 1, pretrained_checkpoint=base, load=adapters)) == []
    # Generation and export read whole models: a LoRA checkpoint is refused with what to do.
    with pytest.raises(format.CheckpointFormatError, match="merge it into its base first"):
        load_model_weights(LlavaModel(llava_config(), ParallelState.single()), adapters, ParallelState.single())
