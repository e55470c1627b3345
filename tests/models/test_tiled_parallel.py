"""The tiled families (LLaVA-NeXT, LLaVA-OneVision, InternVL) trained at pp=2 and at dp=2 with the
distributed optimizer equal one process: two optimizer steps of the real training step
(megamm.training.step.train_step) from the same seed on the same global batches; the losses and
grad norms of both steps, the first step's gradients and the weights after the second, fp32.

The microbatches come from the data pipeline (one row each; every step mixes padded and packed
rows, so each dp rank holds both kinds): LLaVA-NeXT's any-resolution tiles with their image sizes
(images of three aspect ratios, a text-only sample), LLaVA-OneVision's (a SigLIP tower, a tied
Qwen2 decoder, anyres_max_1: the 12x24 and 30x12 images' feature grids are shrunk bilinearly; a
row per step with a video of three frames before its sample, pooled frame features) and InternVL's
tiles for pixel shuffle (1, 4 and 3 tiles with NVLM tile tags). Each pipeline stage gets only the
keys megamm.training.data gives it (`stage_keys`): the tiles, image sizes, video frames and ids on the first,
positions and the packed mask on both, labels on the last.

With the distributed optimizer each dp rank holds, after the step, only its shard of the reduced
and clipped gradients; that shard is compared, and the shards of both ranks together cover every
trainable element. One spawned job of 2 gloo processes runs every case.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megamm.config import LlavaConfig, ParallelConfig
from megamm.config.anyres import AnyResConfig, video_tokens
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.data.batching import packed_microbatches, padded_microbatches
from megamm.data.samples import Sample
from megamm.optim.grad_buffer import GradBuffer
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.pipeline.chunks import build_model_chunks
from megamm.training.data import stage_keys
from megamm.training.step import build_trainer, train_step
from tests.data.test_anyres_samples import PINPOINTS, TILE, anyres_model, build_samples
from tests.data.test_anyres_samples import SEQ as ANYRES_SEQ
from tests.data_fixtures import write_dataset
from tests.distributed import run_distributed, solo_state
from tests.models.test_internvit import internvl_samples
from tests.tiny import internvl_config, qwen2_language_config, vision_config, without_key_bias

STEPS = 2
ROWS_PER_STEP = 4
TOLERANCE = 1e-5
# As in tests/training/test_step.py: Adam turns 1e-7 gradient rounding of near-zero elements into
# larger relative weight differences.
WEIGHT_TOLERANCE = 5e-5
ONEVISION_MAX_PATCHES = 1
VIDEO_FRAMES = 3
# Rows long enough for two of the InternVL samples (35, 59 and 45 tokens) packed together.
INTERNVL_ROWS = 112
FAMILIES = ("llava_next", "llava_onevision", "internvl")
LAYOUTS = ("pp2", "dp2_distributed_optimizer")


class Case:
    """A family's model, run settings and global batches: `steps[i]` the ROWS_PER_STEP one-row
    microbatches of step i, padded and packed alternating."""

    def __init__(self, model: LlavaConfig, steps: list[list[dict]], seq: int, **training) -> None:
        self.model, self.steps, self.seq, self.training = model, steps, seq, training


def _steps(samples: list[Sample], padded: list[int], packed: list[list[int]], seq: int, pad: int) -> list[list[dict]]:
    """Step i: padded rows of samples `padded[2i]`, `padded[2i+1]` and packed rows of the groups
    `packed[2i]`, `packed[2i+1]`, as [padded, packed, padded, packed]."""
    shape = (3, TILE, TILE)
    rows = []
    for i in range(STEPS * ROWS_PER_STEP // 2):
        (padded_row,) = padded_microbatches([samples[padded[i]]], 1, seq, pad, shape)
        (packed_row,) = packed_microbatches([samples[j] for j in packed[i]], 1, seq, pad, shape)
        assert packed_row["segment_ids"] is not None
        rows += [padded_row, packed_row]
    return [rows[i:i + ROWS_PER_STEP] for i in range(0, len(rows), ROWS_PER_STEP)]


def _with_video(row: dict, video_token: int, grid: int, seed: int) -> dict:
    """A padded one-row microbatch with a video of VIDEO_FRAMES random frames before its sample (the
    row's end cut to keep its length; labels ignore the video)."""
    count = video_tokens(VIDEO_FRAMES, grid)
    seq = row["input_ids"].shape[1]
    video_ids = torch.full((1, count), video_token)
    ignored = torch.full((1, count), -100)
    frames = torch.randn(1, VIDEO_FRAMES, 3, TILE, TILE, generator=torch.Generator().manual_seed(seed))
    return {**row, "input_ids": torch.cat([video_ids, row["input_ids"]], dim=1)[:, :seq],
            "labels": torch.cat([ignored, row["labels"]], dim=1)[:, :seq], "pixel_values_videos": frames,
            "videos_per_sample": torch.tensor([1])}


def _cases(root: Path) -> dict[str, Case]:
    files = write_dataset(root / "anyres", rows=12)
    samples, _, _ = build_samples(files)
    # Samples 0/1 are 12x24 images, 2/4 30x12, 3 16x16, 5 text-only.
    padded, packed = [0, 2, 3, 5], [[0, 2], [3, 4], [1, 5, 6], [2, 3]]
    data = {"data_path": [str(files.train)], "tokenizer_model": str(files.tokenizer), "pack_sequences": True}
    next_model = anyres_model(files)
    siglip = replace(vision_config(activation="gelu_tanh"), family="siglip", class_token=False, pre_norm=False)
    onevision_model = replace(
        next_model, vision=siglip,
        # The video token: one id past the tokenizer's, so no text token is taken for one.
        language=replace(qwen2_language_config(), vocab_size=next_model.language.vocab_size + 1,
                         image_token_id=next_model.language.image_token_id,
                         video_token_id=next_model.language.vocab_size),
        anyres=AnyResConfig(PINPOINTS, max_num_patches=ONEVISION_MAX_PATCHES))
    onevision_samples, _, _ = build_samples(files, onevision_model.anyres, "siglip")
    onevision_steps = _steps(onevision_samples, padded, packed, ANYRES_SEQ, 0)
    # A video in one padded row per step: at dp=2 on rank 1 in step 0 (rank 0 has none), on rank 0 in step 1.
    for step, index in ((0, 2), (1, 0)):
        onevision_steps[step][index] = _with_video(onevision_steps[step][index], onevision_model.language.video_token_id,
                                                   onevision_model.vision.grid_size, seed=step)
    (root / "internvl").mkdir()
    internvl, tokenizer = internvl_samples(root / "internvl")
    internvl_model = internvl_config(vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_token_id)
    return {
        "llava_next": Case(next_model, _steps(samples, padded, packed, ANYRES_SEQ, 0), ANYRES_SEQ, **data),
        "llava_onevision": Case(onevision_model, onevision_steps, ANYRES_SEQ, **data),
        "internvl": Case(internvl_model, _steps(internvl, [0, 1, 2, 1], [[0, 1], [1, 2], [2, 0], [0, 1]],
                                                INTERNVL_ROWS, tokenizer.pad_id), INTERNVL_ROWS, mock_data=True),
    }


def _run_config(case: Case, parallel: ParallelConfig, **training) -> RunConfig:
    settings = {
        "micro_batch_size": 1, "global_batch_size": ROWS_PER_STEP, "seq_length": case.seq, "train_iters": STEPS,
        "lr": 3e-3, "min_lr": 1e-4, "lr_warmup_iters": 1, "weight_decay": 0.1, "clip_grad": 0.5, "seed": 5,
        "projector_lr": 1e-2, **case.training, **training,
    }
    return RunConfig(model=case.model, parallel=parallel, training=TrainingConfig(**settings))


def _owned_grads(buffers: list[GradBuffer], names: dict[torch.nn.Parameter, str]) -> dict[str, torch.Tensor]:
    """Each trainable parameter's (reduced, clipped) main grad, flattened, NaN where this rank does not
    own it (the distributed optimizer reduces and clips only its shard of each bucket)."""
    grads = {}
    for buffer in buffers:
        for param in buffer.params:
            start, end = buffer.offsets[param]
            grad = buffer.main_grad(param).detach().flatten().clone()
            if buffer.shard_for_optimizer:
                owned = torch.zeros(end - start, dtype=torch.bool)
                for bucket in buffer.buckets:
                    low, high = buffer.shard_range(bucket)
                    owned[max(low, start) - start:max(min(high, end) - start, 0)] = True
                grad[~owned] = float("nan")
            grads[names[param]] = grad
    return grads


def _train(run: RunConfig, state: ParallelState, steps: list[list[dict]]) -> dict:
    config = resolve(run, state.world_size)
    state.seed(config.training.seed)
    chunks = build_model_chunks(config, state)
    trainer = build_trainer(config, state, chunks)
    names = {p: n for chunk in chunks for n, p in chunk.named_parameters()}
    keys = stage_keys(state, packed=True)
    per_rank = ROWS_PER_STEP // state.dp_size
    losses, norms, grads = [], [], {}
    for iteration, global_batch in enumerate(steps):
        mine = global_batch[state.dp_rank * per_rank:(state.dp_rank + 1) * per_rank]
        result = train_step(trainer, [{k: mb[k] for k in keys if k in mb} for mb in mine], iteration)
        assert result.applied
        losses.append(result.loss)
        norms.append(result.grad_norm)
        if iteration == 0:
            grads = _owned_grads(trainer.buffers, names)
    language = config.model.language.transformer
    final = {n: without_key_bias(n, p.detach().clone(), language) for p, n in names.items()}
    return {"losses": losses, "norms": norms, "grads": grads, "final": final}


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm().clamp(min=1e-12)).item()


def _compare(run: dict, reference: dict) -> dict:
    grad_errors, owned = {}, 0
    for name, grad in run["grads"].items():
        mine = ~grad.isnan()
        owned += int(mine.sum())
        if mine.any():
            grad_errors[name] = _relative(grad[mine], reference["grads"][name][mine])
    weight_errors = {n: _relative(w, reference["final"][n]) for n, w in run["final"].items()}
    worst_grad = max(grad_errors, key=grad_errors.get)
    worst_weight = max(weight_errors, key=weight_errors.get)
    return {
        "loss_errors": [abs(a - b) / abs(b) for a, b in zip(run["losses"], reference["losses"])],
        "norm_errors": [abs(a - b) / abs(b) for a, b in zip(run["norms"], reference["norms"])],
        "grad_error": (worst_grad, grad_errors[worst_grad]), "weight_error": (worst_weight, weight_errors[worst_weight]),
        "owned": owned, "held": sorted(run["grads"]),
        "zero_reference_grads": [n for n in run["grads"] if reference["grads"][n].norm() == 0],
        "clipped": reference["norms"][0] > 0.5,
        "reference_trainable": sum(g.numel() for g in reference["grads"].values()),
        "reference_names": sorted(reference["grads"]),
    }


def _job(cases: dict[str, Case]) -> dict[str, dict]:
    dp2 = initialize_parallel_state()
    solo = solo_state()
    pp2 = ParallelState.from_groups(tp=1, pp=2, device=torch.device("cpu"))
    results = {}
    for family, case in cases.items():
        reference = _train(_run_config(case, ParallelConfig()), solo, case.steps)
        pipeline = _train(_run_config(case, ParallelConfig(pipeline_model_parallel_size=2)), pp2, case.steps)
        results[f"{family}-pp2"] = _compare(pipeline, reference)
        sharded = _train(_run_config(case, ParallelConfig(), use_distributed_optimizer=True, ddp_bucket_size=4000),
                         dp2, case.steps)
        results[f"{family}-dp2_distributed_optimizer"] = _compare(sharded, reference)
    return results


@pytest.fixture(scope="module")
def parity_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_distributed(_job, 2, _cases(tmp_path_factory.mktemp("tiled")), timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_tiled_family_training_matches_single_process(parity_results: list[dict], family: str, layout: str) -> None:
    case = f"{family}-{layout}"
    for rank, results in enumerate(parity_results):
        r, where = results[case], f"rank {rank} {case}"
        assert r["clipped"], "clipping must be active for the norm comparison to mean something"
        assert max(r["loss_errors"]) < TOLERANCE, f"{where}: loss relative errors {r['loss_errors']}"
        assert max(r["norm_errors"]) < TOLERANCE, f"{where}: grad norm relative errors {r['norm_errors']}"
        assert r["grad_error"][1] < TOLERANCE, f"{where}: first-step gradient of {r['grad_error']}"
        assert r["weight_error"][1] < WEIGHT_TOLERANCE, f"{where}: updated weight of {r['weight_error']}"
        assert not r["zero_reference_grads"], f"{where}: parameters without gradient {r['zero_reference_grads']}"
    held = [set(results[case]["held"]) for results in parity_results]
    everything = set(parity_results[0][case]["reference_names"])
    if layout == "pp2":
        assert {n.split(".")[0] for n in held[1]} == {"language"}, "the second stage holds only decoder layers"
        assert held[0] | held[1] == everything
        assert any(n.startswith(("vision.", "projector.")) for n in held[0])
    else:
        assert held[0] == held[1] == everything
        owned = sum(results[case]["owned"] for results in parity_results)
        assert owned == parity_results[0][case]["reference_trainable"], "the dp shards cover every element once"
    if family != "internvl":
        assert "anyres.image_newline" in held[0]
