"""Context parallelism for the tiled families equals the single-process run: loss, grad norm, the
first step's gradients and the updated weights over two optimizer steps (fp32), at cp=2.

One spawned job of 2 ranks trains, on every rank, a single-process reference (its own size-1 groups)
and the cp=2 run from the same seed on the same microbatches:
- any-resolution (LLaVA-NeXT's tiling with LLaVA-OneVision's multi-image rule): microbatches from
  the data pipeline (images of several aspect ratios, each a base image plus its tiles, text-only
  samples, and in the first padded microbatch and the first packed row a three-image sample whose
  images are one tower input each, beside a tiled one), padded rows and packed rows (4 images a
  row, sample boundaries inside chunks); each cp rank
  encodes only its share of the images (an image with all its tiles), and the newline embedding's
  gradient (partial on each cp rank) is compared after the dp x cp reduction;
- InternVL (InternViT with QK norm, pixel shuffle into 4 tokens per tile): the synthetic multimodal
  set, two 4-token images per 48-token sample (chunks of 12 tokens, so images cross chunk boundaries).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megamm.config import LlavaConfig, ParallelConfig
from megamm.config.anyres import AnyResConfig
from megamm.data.batching import packed_microbatches, padded_microbatches
from megamm.parallel.state import ParallelState, initialize_parallel_state
from tests.data.test_anyres_samples import (
    PINPOINTS,
    SEQ,
    TILE,
    anyres_model,
    build_samples,
    onevision_samples,
)
from tests.data_fixtures import write_dataset
from tests.distributed import run_distributed, solo_state
from tests.tiny import internvl_config
from tests.training.test_context_parallel import _check, _compare, _run_config, _train

NEWLINE = "anyres.image_newline"
MULTI_IMAGE = AnyResConfig(PINPOINTS, single_tile_multi_image=True)


def _fixed(microbatches: list[dict], per_step: int):
    """The batches callable of `_train`: step i takes microbatches [i * per_step, (i + 1) * per_step)."""
    def batches(config, state: ParallelState, iteration: int) -> list[dict]:
        return microbatches[iteration * per_step : (iteration + 1) * per_step]
    return batches


def _job(anyres: LlavaConfig, data: dict[str, object], kinds: dict[str, tuple[list[dict], int, int]]) -> dict:
    """data: the dataset flags an any-resolution run names (the microbatches come built, in kinds)."""
    initialize_parallel_state()
    solo = solo_state()
    cp2 = ParallelState.from_groups(tp=1, pp=1, device=torch.device("cpu"), cp=2)
    results = {}
    for kind, (microbatches, micro_batch_size, per_step) in kinds.items():
        settings = {"seq_length": SEQ, "micro_batch_size": micro_batch_size, "images_per_sample": 0,
                    "global_batch_size": per_step * micro_batch_size, "clip_grad": 0.05, "mock_data": False,
                    **data}
        batches = _fixed(microbatches, per_step)
        reference = _train(_run_config(ParallelConfig(), anyres, **settings), solo, batches)
        run = _train(_run_config(ParallelConfig(context_parallel_size=2), anyres, **settings), cp2, batches)
        results[f"anyres_{kind}"] = _compare(run, reference)
        results[f"anyres_{kind}"]["newline_grad"] = reference["grads"][NEWLINE].norm().item()
        results[f"anyres_{kind}"]["tower_inputs_reference"] = reference["tower_inputs"]
    internvl = internvl_config(vocab_size=100)
    reference = _train(_run_config(ParallelConfig(), internvl), solo)
    results["internvl"] = _compare(_train(_run_config(ParallelConfig(context_parallel_size=2), internvl), cp2),
                                   reference)
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    files = write_dataset(tmp_path_factory.mktemp("anyres_cp"), rows=12)
    samples = onevision_samples(files, MULTI_IMAGE)[0] + build_samples(files, MULTI_IMAGE)[0]
    shape = (3, TILE, TILE)
    # Microbatches of two or more images (so both cp ranks encode some): two steps of two padded
    # microbatches of 2 rows, two steps of one packed row of 4 images each; the first padded
    # microbatch and the first packed row hold the three-image sample.
    padded = [mb for mb in padded_microbatches(samples, 2, SEQ, 0, shape)
              if mb["image_sizes"] is not None and len(mb["image_sizes"]) > 1][:4]
    rows = packed_microbatches(samples, 1, SEQ, 0, shape)
    packed = [next(mb for mb in rows if 3 in mb["batch_num_images"].tolist()), rows[0]]
    assert all(3 in mb["batch_num_images"].tolist() for mb in (padded[0], packed[0]))
    kinds = {"padded": (padded, 2, 2), "packed": (packed, 1, 1)}
    for kind, (microbatches, _, per_step) in kinds.items():
        assert len(microbatches) == 2 * per_step, f"{kind}: {len(microbatches)} microbatches for two steps"
        assert all(mb["image_sizes"] is not None and len(mb["image_sizes"]) > 1 for mb in microbatches), kind
    data = {"data_path": [str(files.train)], "tokenizer_model": str(files.tokenizer)}
    return run_distributed(_job, 2, replace(anyres_model(files), anyres=MULTI_IMAGE), data, kinds)


CASES = ["anyres_padded", "anyres_packed", "internvl"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_context_parallel_matches_single_process(results: list[dict], case: str) -> None:
    _check(results, case)
    if case.startswith("anyres"):
        assert all(r[case]["newline_grad"] > 0 for r in results), "the newline embedding must have a gradient"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["anyres_padded", "anyres_packed"])
def test_each_cp_rank_encodes_a_share_of_the_tower_inputs(results: list[dict], case: str) -> None:
    """Per microbatch the two cp ranks' towers together see every tower input once, each a part
    (an image with all its tiles; InternVL's fixed-size tiles go round robin as in
    tests/training/test_context_parallel.py)."""
    reference = results[0][case]["tower_inputs_reference"]
    assert all(r[case]["tower_inputs_reference"] == reference for r in results)
    mine = [r[case]["tower_inputs"] for r in results]
    assert all(len(m) == len(reference) for m in mine), f"{case}: a rank's tower did not run per microbatch: {mine}"
    for microbatch, total in enumerate(reference):
        parts = [m[microbatch] for m in mine]
        assert sum(parts) == total and max(parts) < total, f"{case} microbatch {microbatch}: {parts} of {total}"
