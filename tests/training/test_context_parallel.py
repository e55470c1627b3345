"""Context-parallel training equals the single-process run: loss, grad norm and updated weights over
two optimizer steps (fp32), with GQA, images spread over chunk boundaries and packed rows.

Two spawned jobs of 4 ranks. Each trains, on every rank, a single-process reference (its own size-1
groups) and the parallel run from the same seed on the same global batches:
- cp=2 x dp=2 (plain and distributed optimizer), cp=4, tp=2 x cp=2 with sequence parallelism, each
  on the synthetic multimodal set (two 17-token images per 48-token sample: chunks of 12 or 6
  tokens, so images cross chunk boundaries), and cp=2 x dp=2 on packed rows (sample boundaries
  inside and across chunks, per-sample position ids, segment ids: the batches' O(s) form); the
  vision tower's image count per rank is recorded;
- pp=2 x cp=2 (1F1B over two microbatches per step) with tied embeddings (Qwen2), and cp=2 x dp=2
  with full activation recompute.
Clipping is active, so the global grad norm is compared too; the first step's gradients (gathered
over tp, every trainable parameter of the rank's stage) are compared directly where the plain
optimizer holds them whole.
"""

from __future__ import annotations

import pytest
import torch

from megamm.config import LlavaConfig, ParallelConfig
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.data.packing import packed_sequence, segment_ids
from megamm.data.synthetic import SyntheticMultimodalDataset, collate, microbatch_indices
from megamm.models import image_shares
from megamm.parallel.params import param_specs
from megamm.parallel.sharding import gather_master
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.pipeline.chunks import build_model_chunks
from megamm.training.step import build_trainer, train_step
from tests.distributed import run_distributed, solo_state
from tests.tiny import (
    NATIVE_SEQ,
    llava_config,
    native_microbatches,
    qwen2_language_config,
    qwen2_vl_config,
    without_key_bias,
)

STEPS = 2
SEQ = 48
TOLERANCE = 1e-5
# As in tests/training/test_step.py: Adam turns 1e-7 gradient rounding of near-zero elements into
# larger relative weight differences.
WEIGHT_TOLERANCE = 5e-5


def _run_config(parallel: ParallelConfig, model: LlavaConfig | None = None, **training) -> RunConfig:
    defaults = {
        "micro_batch_size": 2, "global_batch_size": 8, "seq_length": SEQ, "train_iters": STEPS, "lr": 3e-3,
        "min_lr": 1e-4, "lr_warmup_iters": 1, "weight_decay": 0.1, "clip_grad": 0.5, "mock_data": True,
        "seed": 5, "images_per_sample": 2, "projector_lr": 1e-2,
    }
    defaults.update(training)
    return RunConfig(model=model or llava_config(), parallel=parallel, training=TrainingConfig(**defaults))


def _synthetic_batches(config, state: ParallelState, iteration: int) -> list[dict]:
    t = config.training
    data = SyntheticMultimodalDataset(config.model, t.seq_length, t.seed, t.images_per_sample)
    indices = microbatch_indices(iteration * t.global_batch_size, t.global_batch_size, t.micro_batch_size,
                                 state.dp_rank, state.dp_size)
    return [collate([data[i] for i in chunk]) for chunk in indices]


def _packed_batches(config, state: ParallelState, iteration: int) -> list[dict]:
    """Rows of two samples (20 + 27 tokens and one padding token, one image each): sample boundaries
    at 20 and 47 fall inside chunks at cp=2 (chunks of 12)."""
    t, model = config.training, config.model
    short = SyntheticMultimodalDataset(model, 20, t.seed, 1)
    long = SyntheticMultimodalDataset(model, 27, t.seed + 1, 1)
    rows = []
    for position in range(iteration * t.global_batch_size, (iteration + 1) * t.global_batch_size):
        samples = [short[position], long[position]]
        packed = packed_sequence([{"input_ids": s["input_ids"].tolist(), "labels": s["labels"].tolist()}
                                  for s in samples], SEQ, pad_id=0)
        rows.append((packed, [s["pixel_values"] for s in samples]))
    per_rank = t.global_batch_size // state.dp_size
    mine = rows[state.dp_rank * per_rank : (state.dp_rank + 1) * per_rank]
    batches = []
    for start in range(0, per_rank, t.micro_batch_size):
        group = mine[start : start + t.micro_batch_size]
        images = [image for _, row_images in group for image in row_images]
        batches.append({
            "input_ids": torch.stack([p["input_ids"] for p, _ in group]),
            "labels": torch.stack([p["labels"] for p, _ in group]),
            "position_ids": torch.stack([p["position_ids"] for p, _ in group]),
            "segment_ids": torch.stack([segment_ids(p["cu_seqlens"], SEQ) for p, _ in group]),
            "pixel_values": torch.cat(images),
            "images_per_sample": torch.tensor([sum(len(i) for i in row_images) for _, row_images in group]),
        })
    return batches


def _native_batches(config, state: ParallelState, iteration: int) -> list[dict]:
    """The padded and the packed microbatch of tests.tiny.native_microbatches (images of 24, 24 and
    16 patches, a video of 32; M-RoPE positions), other text at each step: both at dp=1, the padded
    one on dp rank 0 and the packed one on dp rank 1 at dp=2; every cp rank reads its dp rank's."""
    return native_microbatches(config.model, seed=11 + iteration)[state.dp_rank :: state.dp_size]


def _held_vision_tokens(input_ids: torch.Tensor, language, state: ParallelState) -> list[int]:
    """[image and video tokens among this cp rank's positions (chunks r and 2cp-1-r of 2cp)], or []
    for a microbatch without any (no exchange runs for it)."""
    ids = [i for i in (language.image_token_id, language.video_token_id) if i is not None]
    vision = sum(input_ids == i for i in ids)
    cp, r = state.cp_size, state.cp_rank
    chunk = input_ids.shape[1] // (2 * cp)
    held = torch.cat([vision[:, r * chunk:(r + 1) * chunk], vision[:, (2 * cp - 1 - r) * chunk:(2 * cp - r) * chunk]],
                     dim=1)
    return [int(held.sum())] if vision.any() else []


def _train(run: RunConfig, state: ParallelState, batches=_synthetic_batches) -> dict:
    config = resolve(run, state.world_size)
    t = config.training
    state.seed(t.seed)
    chunks = build_model_chunks(config, state)
    trainer = build_trainer(config, state, chunks)
    images_seen: list[int] = []
    if chunks[0].pre_process:
        chunks[0].vision.register_forward_pre_hook(lambda _, args: images_seen.append(args[0].shape[0]))
    arrived: list[int] = []
    exchange = image_shares.exchange_rows

    def counting_exchange(*args, **kwargs) -> torch.Tensor:
        received = exchange(*args, **kwargs)
        arrived.append(received.shape[0])
        return received

    losses, norms, images, share, held = [], [], 0, 0, []
    for iteration in range(t.train_iters):
        microbatches = batches(config, state, iteration)
        for mb in microbatches:
            n = 0 if mb["pixel_values"] is None else mb["pixel_values"].shape[0]
            images += n
            share += len(range(state.cp_rank, n, state.cp_size))
            held += _held_vision_tokens(mb["input_ids"], config.model.language, state)
        image_shares.exchange_rows = counting_exchange
        try:
            result = train_step(trainer, microbatches, iteration)
        finally:
            image_shares.exchange_rows = exchange
        assert result.applied
        if iteration == 0:
            first_grads = _gathered_grads(trainer, chunks, state)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    final = {}
    language = config.model.language.transformer
    for chunk in chunks:
        specs = param_specs(chunk)
        for name, p in chunk.named_parameters():
            final[name] = without_key_bias(name, gather_master(p.detach(), specs[name].layout, state.tp_group),
                                           language)
    grads = {} if t.use_distributed_optimizer else first_grads
    return {"losses": losses, "norms": norms, "final": final, "grads": grads, "images_seen": sum(images_seen),
            "images": images, "share": share, "tower_inputs": images_seen, "arrived": arrived, "held": held}


def _gathered_grads(trainer, chunks, state: ParallelState) -> dict[str, torch.Tensor]:
    """The step's (clipped) main grads by name, gathered over tp (whole only with the plain optimizer:
    the distributed one clips its own shard)."""
    main_grads = {p: buffer.main_grad(p) for buffer in trainer.buffers for p in buffer.params}
    grads = {}
    for chunk in chunks:
        specs = param_specs(chunk)
        for name, p in chunk.named_parameters():
            if p in main_grads:
                grads[name] = gather_master(main_grads[p].clone(), specs[name].layout, state.tp_group)
    return grads


def _compare(run: dict, reference: dict) -> dict:
    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-12)

    errors = {n: ((w - reference["final"][n]).norm() / reference["final"][n].norm().clamp(min=1e-12)).item()
              for n, w in run["final"].items()}
    worst = max(errors, key=errors.get)
    grad_errors = {n: ((g - reference["grads"][n]).norm() / reference["grads"][n].norm().clamp(min=1e-12)).item()
                   for n, g in run["grads"].items()}
    return {
        "grad_error": max(grad_errors.values(), default=0.0), "grads_compared": len(grad_errors),
        "loss_error": max(rel(a, b) for a, b in zip(run["losses"], reference["losses"])),
        "norm_error": max(rel(a, b) for a, b in zip(run["norms"], reference["norms"])),
        "weight_error": errors[worst], "worst_weight": worst, "clipped": reference["norms"][0] > 0.5,
        "images_seen": run["images_seen"], "images": run["images"], "share": run["share"],
        "tower_inputs": run["tower_inputs"], "arrived": run["arrived"], "held": run["held"],
    }


def _cp_job() -> dict:
    initialize_parallel_state()
    solo = solo_state()
    cp2 = ParallelState.from_groups(tp=1, pp=1, device=torch.device("cpu"), cp=2)
    cp4 = ParallelState.from_groups(tp=1, pp=1, device=torch.device("cpu"), cp=4)
    tp2_cp2 = ParallelState.from_groups(tp=2, pp=1, device=torch.device("cpu"), cp=2)
    one = ParallelConfig()
    reference = _train(_run_config(one), solo)
    results = {
        "cp2_dp2": _compare(_train(_run_config(ParallelConfig(context_parallel_size=2)), cp2), reference),
        "cp2_dp2_distributed_optimizer": _compare(_train(
            _run_config(ParallelConfig(context_parallel_size=2), use_distributed_optimizer=True,
                        overlap_grad_reduce=True, ddp_bucket_size=3000), cp2), reference),
        "cp4": _compare(_train(_run_config(ParallelConfig(context_parallel_size=4)), cp4), reference),
        "tp2_cp2_sp": _compare(_train(_run_config(ParallelConfig(
            tensor_model_parallel_size=2, context_parallel_size=2, sequence_parallel=True)), tp2_cp2), reference),
    }
    packed_reference = _train(_run_config(one), solo, _packed_batches)
    results["cp2_dp2_packed"] = _compare(
        _train(_run_config(ParallelConfig(context_parallel_size=2)), cp2, _packed_batches), packed_reference)
    return results


def _pp_job() -> dict:
    """pp=2 x cp=2 with Qwen2's tied embeddings (the two stages' table copies synced over cp too);
    cp=2 x dp=2 with full recompute (the ring runs again inside backward)."""
    initialize_parallel_state()
    solo = solo_state()
    pp2_cp2 = ParallelState.from_groups(tp=1, pp=2, device=torch.device("cpu"), cp=2)
    cp2 = ParallelState.from_groups(tp=1, pp=1, device=torch.device("cpu"), cp=2)
    qwen2 = llava_config(language=qwen2_language_config())
    reference = _train(_run_config(ParallelConfig(), qwen2, global_batch_size=4), solo)
    run = _run_config(ParallelConfig(pipeline_model_parallel_size=2, context_parallel_size=2), qwen2,
                      global_batch_size=4)
    results = {"pp2_cp2_tied": _compare(_train(run, pp2_cp2), reference)}
    recompute = {"global_batch_size": 4, "recompute_granularity": "full"}
    results["cp2_dp2_full_recompute"] = _compare(
        _train(_run_config(ParallelConfig(context_parallel_size=2), **recompute), cp2),
        _train(_run_config(ParallelConfig(), **recompute), solo))
    return results


def _native_job() -> dict:
    """The Qwen2-VL family on 4 ranks (M-RoPE positions split with the tokens, images and videos
    encoded in shares balanced by patches, padded and packed rows): both families at cp=2 x dp=2,
    and Qwen2-VL at tp=2 x cp=2 with sequence parallelism, pp=2 x cp=2 (1F1B over the two
    microbatches) and cp=4 (chunks of 5 tokens: every image and the video crosses a chunk
    boundary, the packed row's sample boundary falls inside a chunk)."""
    initialize_parallel_state()
    solo = solo_state()
    cpu = torch.device("cpu")
    states = {
        "cp2_dp2": (ParallelConfig(context_parallel_size=2), ParallelState.from_groups(tp=1, pp=1, device=cpu, cp=2)),
        "tp2_cp2_sp": (ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2, sequence_parallel=True),
                       ParallelState.from_groups(tp=2, pp=1, device=cpu, cp=2)),
        "pp2_cp2": (ParallelConfig(pipeline_model_parallel_size=2, context_parallel_size=2),
                    ParallelState.from_groups(tp=1, pp=2, device=cpu, cp=2)),
        "cp4": (ParallelConfig(context_parallel_size=4), ParallelState.from_groups(tp=1, pp=1, device=cpu, cp=4)),
    }
    layouts = {"qwen2_vl": list(states), "qwen2_5_vl": ["cp2_dp2"]}
    results = {}
    for family, names in layouts.items():
        model = qwen2_vl_config(family)
        # adam_eps 1e-6: an element whose gradient is ~1e-9 (one in Qwen2.5-VL's decoder here) would
        # otherwise take a step of ~lr from its 1e-7 relative rounding (Adam's first step is
        # g / (|g| + eps)); the gradients themselves are compared at 1e-5.
        settings = {"global_batch_size": 4, "seq_length": NATIVE_SEQ, "images_per_sample": 0, "adam_eps": 1e-6}
        reference = _train(_run_config(ParallelConfig(), model, **settings), solo, _native_batches)
        for name in names:
            parallel, state = states[name]
            run = _train(_run_config(parallel, model, **settings), state, _native_batches)
            results[f"{family}_{name}"] = _compare(run, reference)
    return results


@pytest.fixture(scope="module")
def cp_results() -> list[dict]:
    return run_distributed(_cp_job, 4)


def _check(per_rank: list[dict], case: str) -> None:
    for rank, results in enumerate(per_rank):
        r = results[case]
        assert r["clipped"], "clipping must be active for the norm comparison to mean something"
        assert r["loss_error"] < TOLERANCE, f"rank {rank} {case}: loss relative error {r['loss_error']}"
        assert r["norm_error"] < TOLERANCE, f"rank {rank} {case}: grad norm relative error {r['norm_error']}"
        assert r["grad_error"] < TOLERANCE, f"rank {rank} {case}: gradient relative error {r['grad_error']}"
        assert r["weight_error"] < WEIGHT_TOLERANCE, (
            f"rank {rank} {case}: updated weights relative error {r['weight_error']} ({r['worst_weight']})")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["cp2_dp2", "cp2_dp2_distributed_optimizer", "cp4", "tp2_cp2_sp", "cp2_dp2_packed"])
def test_context_parallel_matches_single_process(cp_results: list[dict], case: str) -> None:
    _check(cp_results, case)


@pytest.fixture(scope="module")
def pp_results() -> list[dict]:
    return run_distributed(_pp_job, 4)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["pp2_cp2_tied", "cp2_dp2_full_recompute"])
def test_pipeline_recompute_and_context_parallel_match_single_process(pp_results: list[dict], case: str) -> None:
    _check(pp_results, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["cp2_dp2", "cp4", "tp2_cp2_sp"])
def test_each_cp_rank_encodes_only_its_share_of_images(cp_results: list[dict], case: str) -> None:
    """The vision tower of cp rank r sees images r, r + cp, ... of each microbatch, not all of them."""
    for rank, results in enumerate(cp_results):
        r = results[case]
        assert r["images_seen"] == r["share"], f"rank {rank} {case}: tower saw {r['images_seen']}, share {r['share']}"
        assert r["share"] < r["images"], f"rank {rank} {case}: the share must be a part of the {r['images']} images"


@pytest.fixture(scope="module")
def native_results() -> list[dict]:
    return run_distributed(_native_job, 4)


NATIVE_CASES = ["qwen2_vl_cp2_dp2", "qwen2_vl_tp2_cp2_sp", "qwen2_vl_pp2_cp2", "qwen2_vl_cp4", "qwen2_5_vl_cp2_dp2"]


@pytest.mark.slow
@pytest.mark.parametrize("case", NATIVE_CASES)
def test_native_resolution_context_parallel_matches_single_process(native_results: list[dict], case: str) -> None:
    _check(native_results, case)


# Patches each global rank's native tower encodes per microbatch over the two steps. Padded: 80
# patches (images of 24 and 24, a video of 32); packed: 96 (a third image of 16). cp=2: padded ->
# cp rank 0 the video, rank 1 both images; packed -> rank 0 the third image and the video, rank 1 the
# others. cp=4: largest first, each to the least-loaded rank (rank 3 has nothing in the padded
# microbatch, so its tower does not run). At dp=2 dp rank 0 reads the padded microbatch, dp rank 1
# the packed one; ranks are tp fastest, then cp, then dp or pp; pp's last stage has no tower.
NATIVE_TOWER_INPUTS = {
    "cp2_dp2": [[32, 32], [48, 48], [48, 48], [48, 48]],
    "tp2_cp2_sp": [[32, 48, 32, 48], [32, 48, 32, 48], [48, 48, 48, 48], [48, 48, 48, 48]],
    "pp2_cp2": [[32, 48, 32, 48], [48, 48, 48, 48], [], []],
    "cp4": [[32, 32, 32, 32], [24, 24, 24, 24], [24, 24, 24, 24], [16, 16]],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", NATIVE_CASES)
def test_each_cp_rank_encodes_only_its_share_of_patches(native_results: list[dict], case: str) -> None:
    """Per microbatch the native tower of each cp rank encodes only its items (NATIVE_TOWER_INPUTS)."""
    expected = NATIVE_TOWER_INPUTS[case.removeprefix("qwen2_vl_").removeprefix("qwen2_5_vl_")]
    for rank, results in enumerate(native_results):
        assert results[case]["tower_inputs"] == expected[rank], f"rank {rank} {case}"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["cp2_dp2", "cp4", "tp2_cp2_sp", "cp2_dp2_packed"])
def test_each_cp_rank_receives_only_the_image_embeddings_it_holds(cp_results: list[dict], case: str) -> None:
    """Per microbatch, the embedding rows arriving at a cp rank are those of the image tokens among
    its positions, not every image's."""
    for rank, results in enumerate(cp_results):
        r = results[case]
        assert r["arrived"] == r["held"], f"rank {rank} {case}: received {r['arrived']}, holds {r['held']}"


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in NATIVE_CASES if "pp2" not in c])
def test_each_cp_rank_receives_only_the_vision_embeddings_it_holds(native_results: list[dict], case: str) -> None:
    """The same for images and videos of native resolution (first stages only: pp is left out)."""
    for rank, results in enumerate(native_results):
        r = results[case]
        assert r["arrived"] == r["held"], f"rank {rank} {case}: received {r['arrived']}, holds {r['held']}"


def test_equal_images_go_round_robin() -> None:
    """Fixed-size images cost the same: cp rank r encodes images r, r + cp, ...; a rank beyond the
    image count gets none; rows follow each rank's items."""
    from megamm.models.image_shares import VisionShares

    shares = VisionShares.balanced([1] * 5, [2] * 5, 3)
    assert [shares.items_of(r) for r in range(3)] == [[0, 3], [1, 4], [2]]
    assert VisionShares.balanced([1], [2], 2).items_of(1) == []
    owner, row = shares.source_rows()
    assert owner.tolist() == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1]
    assert row.tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3]


def test_native_items_balance_by_patches() -> None:
    """Images of 24, 24 and 16 patches and a video of 32 (the packed microbatch of
    tests.tiny.native_microbatches) split 48 / 48 over two ranks; largest first, ties to rank 0."""
    from megamm.models.image_shares import VisionShares

    shares = VisionShares.balanced([24, 24, 16, 32], [6, 6, 4, 8], 2)
    assert shares.owners == (1, 1, 0, 0)
    assert [shares.rows_of(r) for r in range(2)] == [12, 12]
