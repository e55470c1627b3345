"""An imported checkpoint computes what transformers computes, at tp=1, tp=2 (sequence parallel),
pp=2 and tp=2 x pp=2; a checkpoint trained by megamm exports to a directory that transformers
loads and that gives megamm's logits. For each language-model family of TEXT_FAMILIES (LLaMA, and
Qwen2 with its q/k/v biases and tied embeddings).

One spawned run of 4 gloo processes, for every family, loads the imported checkpoint at every
layout through the training code path (build_model_chunks, Checkpointer.load with --no-load-optim
semantics), then trains two steps at tp=2 x pp=2, saves, and reloads the trained checkpoint at tp=2
for logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration

from megamm.checkpoint import format
from megamm.checkpoint.checkpointer import Checkpointer
from megamm.config.parsing import run_config_from_dict
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig
from megamm.convert.exporter import export_hf
from megamm.convert.importer import import_llava_hf
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.pipeline.chunks import build_model_chunks
from megamm.training.step import build_trainer, evaluate, train_step
from tests.convert.test_roundtrip import TEXT_FAMILIES, VOCAB, build_hf_llava, llava_batch, save_hf
from tests.distributed import run_distributed

LOGIT_ATOL = 1e-4
LOSS_RTOL = 1e-5
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def _run_config(description: dict, tp: int, pp: int, world: int) -> RunConfig:
    tree = dict(description["config"])
    tree["parallel"] = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                        "sequence_parallel": tp > 1}
    dp = world // (tp * pp)
    tree["training"] = {"micro_batch_size": 1, "global_batch_size": 2 * dp, "seq_length": 40, "mock_data": True,
                        "lr": 2e-3, "train_iters": 4, "seed": 11, "clip_grad": 0.0}
    return run_config_from_dict(tree, world_size=world)


def _microbatches(batch: dict) -> list[dict]:
    return [{k: v[i:i + 1] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]


def _session(load: str, tp: int, pp: int, save: str | None = None):
    description = format.read_description(format.resolve(load))
    world = dist.get_world_size()
    config = resolve(_run_config(description, tp, pp, world), world)
    state = ParallelState.from_groups(tp=tp, pp=pp, device=torch.device("cpu"))
    state.seed(config.training.seed)
    chunks = build_model_chunks(config, state)
    trainer = build_trainer(config, state, chunks)
    checkpointer = Checkpointer(state, config, chunks, trainer.optimizer, trainer.scaler, save_dir=save,
                                log=lambda _: None)
    progress = checkpointer.load(load, load_optim=False)
    return state, chunks, trainer, checkpointer, progress


@torch.no_grad()
def _full_logits(state: ParallelState, model, batch: dict) -> torch.Tensor:
    """`[b, s, V]` logits of a pp=1 model, gathered over tp and stripped of vocabulary padding."""
    model.eval()
    out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                images_per_sample=batch["images_per_sample"], return_logits=True)
    local = out["logits"].contiguous()  # [s, b, V_pad / tp]
    pieces = [torch.empty_like(local) for _ in range(state.tp_size)]
    dist.all_gather(pieces, local, group=state.tp_group)
    return torch.cat(pieces, dim=-1)[..., :VOCAB].transpose(0, 1).contiguous()


def _parity_job(checkpoints: dict[str, tuple[str, str]], batch: dict) -> dict:
    """family -> its results, for (imported, trained) checkpoint directories per family."""
    initialize_parallel_state()
    return {family: _family_parity(imported, trained, batch) for family, (imported, trained) in checkpoints.items()}


def _family_parity(imported: str, trained: str, batch: dict) -> dict:
    results: dict = {}
    for tp, pp in LAYOUTS:
        state, chunks, trainer, _, progress = _session(imported, tp, pp)
        entry = {"iteration": progress.iteration, "loss": evaluate(trainer, [_microbatches(batch)])}
        if pp == 1:
            entry["logits"] = _full_logits(state, chunks[0], batch)
        results[(tp, pp)] = entry
    # Train at tp=2 x pp=2 (sequence parallel), save, and reload at tp=2 for logits.
    state, chunks, trainer, checkpointer, _ = _session(imported, 2, 2, save=trained)
    for iteration in range(2):
        train_step(trainer, _microbatches(batch), iteration)
    checkpointer.save(2, 4)
    state, chunks, _, _, progress = _session(trained, 2, 1)
    results["trained"] = {"iteration": progress.iteration, "logits": _full_logits(state, chunks[0], batch)}
    return results


def _hf_outputs(model: LlavaForConditionalGeneration, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """HF logits `[b, s, V]` and the per-token mean next-token loss over the labelled positions."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return logits, loss


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """family -> the transformers reference and every rank's results (one spawned run for all)."""
    batch = llava_batch()
    out, checkpoints = {}, {}
    for family in TEXT_FAMILIES:
        root = tmp_path_factory.mktemp(f"parity-{family}")
        hf = build_hf_llava(seed=4, text=family)
        import_llava_hf(save_hf(hf, root / "hf"), root / "imported", tp=2, pp=2)
        checkpoints[family] = (str(root / "imported"), str(root / "trained"))
        logits, loss = _hf_outputs(hf, batch)
        out[family] = {"root": root, "batch": batch, "hf_logits": logits, "hf_loss": loss}
    per_rank = run_distributed(_parity_job, 4, checkpoints, batch, timeout=900)
    for family in TEXT_FAMILIES:
        out[family]["ranks"] = [rank[family] for rank in per_rank]
    return out


@pytest.fixture(params=TEXT_FAMILIES)
def parity(runs: dict, request: pytest.FixtureRequest) -> dict:
    return runs[request.param]


def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    diff = (got - want).abs().max().item()
    return diff, diff / want.abs().max().item()


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"tp{tp}-pp{pp}" for tp, pp in LAYOUTS])
def test_imported_checkpoint_matches_transformers(parity: dict, layout: tuple[int, int]) -> None:
    """Same loss as transformers through the training schedule at every layout (pp=2 through the
    1F1B pipeline), and the same logits at pp=1, from a checkpoint that starts at iteration 0."""
    entries = [rank[layout] for rank in parity["ranks"]]
    assert all(entry["iteration"] == 0 for entry in entries)
    want = parity["hf_loss"].item()
    for entry in entries:
        assert abs(entry["loss"] - want) <= LOSS_RTOL * want, f"{layout}: loss {entry['loss']} vs transformers {want}"
    print(f"tp{layout[0]} pp{layout[1]}: loss relative error {abs(entries[0]['loss'] - want) / want:.3e}")
    if layout[1] == 1:
        absolute, relative = _errors(entries[0]["logits"], parity["hf_logits"])
        print(f"tp{layout[0]} pp{layout[1]}: max |logits diff| {absolute:.3e} (relative {relative:.3e})")
        assert absolute < LOGIT_ATOL


def test_trained_checkpoint_exports_to_transformers(parity: dict) -> None:
    """A checkpoint saved by training at tp=2 x pp=2 (with optimizer state) exports to a directory
    LlavaForConditionalGeneration.from_pretrained loads, giving megamm's logits, in both key spellings."""
    trained = parity["ranks"][0]["trained"]
    assert trained["iteration"] == 2
    # Training changed the model: the logits moved away from the imported ones.
    assert (trained["logits"] - parity["hf_logits"]).abs().max() > 1e-2
    root = parity["root"]
    tokenizer = root / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    for style in ("legacy", "installed"):
        out = root / f"export-{style}"
        summary = export_hf(root / "trained", out, tokenizer=tokenizer, key_style=style)
        assert summary.copied == ["tokenizer_config.json"]
        model, info = LlavaForConditionalGeneration.from_pretrained(out, attn_implementation="eager",
                                                                     output_loading_info=True)
        assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        model.eval()
        logits, _ = _hf_outputs(model, parity["batch"])
        absolute, relative = _errors(logits, trained["logits"])
        print(f"export ({style} keys): max |logits diff| {absolute:.3e} (relative {relative:.3e})")
        assert absolute < LOGIT_ATOL
