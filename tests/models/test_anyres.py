"""The any-resolution layout (LLaVA-NeXT) in parallel: one spawned run of 2 gloo processes trains a
tiny any-resolution LlavaModel at tp=2 with sequence parallelism and at tp=1 from the same seed, on
microbatches from the data pipeline (padded rows, then packed rows: images of different aspect
ratios, text-only samples, per-sample token checks), and compares the loss, every parameter's
gradient of the first step (gathered to the master layout; the newline embedding's included, which
must not be zero), and the losses of the two steps after it (three AdamW steps taken by hand, so
those losses follow the updated parameters); fp32, 1e-5 relative.

The model's agreement with transformers' own LLaVA-NeXT is tests/convert/test_llava_next.py.
"""

from __future__ import annotations

import pytest
import torch

from megamm.config import LlavaConfig
from megamm.data.batching import packed_microbatches, padded_microbatches
from megamm.models.llava import LlavaModel
from megamm.parallel.params import param_specs
from megamm.parallel.sharding import gather_master
from megamm.parallel.state import ParallelState, initialize_parallel_state
from tests.data.test_anyres_samples import SEQ, TILE, anyres_model, build_samples
from tests.data_fixtures import write_dataset
from tests.distributed import run_distributed
from tests.models.test_tp_parity import _relative_error, _run

SEED = 77
TOLERANCE = 1e-5
STEPS = 3


def _train(model: LlavaModel, batches: list[dict]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """STEPS AdamW steps over `batches` (one microbatch each); the losses and the first step's grads."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, first_grads = [], {}
    specs = param_specs(model)
    for step in range(STEPS):
        optimizer.zero_grad()
        losses.append(_run(model, batches[step % len(batches)]).item())
        if step == 0:
            first_grads = {n: gather_master(p.grad, specs[n].layout, model.state.tp_group)
                           for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
    return losses, first_grads


def _job(config: LlavaConfig, kinds: dict[str, list[dict]]) -> dict:
    reference_state = initialize_parallel_state(tensor_model_parallel_size=1)
    state = ParallelState.from_groups(tp=2, pp=1, device=torch.device("cpu"))
    results = {}
    for kind, batches in kinds.items():
        models = []
        for model_state, sp in ((reference_state, False), (state, True)):
            model_state.seed(SEED)
            model = LlavaModel(config, model_state, sequence_parallel=sp)
            model.initialize(SEED)
            models.append(model)
        (ref_losses, ref_grads), (losses, grads) = (_train(m, batches) for m in models)
        results[kind] = {
            "losses": losses, "reference_losses": ref_losses,
            "grad_error": max(_relative_error(grads[n], ref_grads[n]) for n in ref_grads),
            "missing_grads": sorted(set(ref_grads) ^ set(grads)),
            "newline_grad": ref_grads["anyres.image_newline"].norm().item(),
        }
    return results


@pytest.mark.slow
def test_tp2_sequence_parallel_training_matches_one_process(tmp_path) -> None:
    files = write_dataset(tmp_path, rows=12)
    samples, _, _ = build_samples(files)
    shape = (3, TILE, TILE)
    kinds = {"padded": padded_microbatches(samples, 2, SEQ, 0, shape)[:STEPS],
             "packed": packed_microbatches(samples, 1, SEQ, 0, shape)[:STEPS]}
    assert all(any(b["image_sizes"] is not None for b in batches) for batches in kinds.values())
    results = run_distributed(_job, 2, anyres_model(files), kinds)
    for rank, per_kind in enumerate(results):
        for kind, result in per_kind.items():
            where = f"rank {rank}, {kind}"
            assert not result["missing_grads"], where
            assert result["newline_grad"] > 0, where
            for loss, reference in zip(result["losses"], result["reference_losses"]):
                assert abs(loss - reference) / reference < TOLERANCE, f"{where}: loss {loss} vs {reference}"
            assert result["grad_error"] < TOLERANCE, f"{where}: grads off by {result['grad_error']:.2e}"
