"""Tensor and sequence parallelism are proven equal to the single-process model.

One spawned job per world size (2 and 4 gloo processes) builds, for every case, the same LlavaModel
twice from the same seed: once at tp=1 (the reference, its own size-1 group on each rank) and once
at tp=world. Both run forward and backward on the same batch; the tp model's parameters and
gradients are gathered to the full (master) layout and compared with the reference's. The tp model
runs the output layer and the loss at the loss positions only, as training does; the reference
computes the full logits (`return_logits=True`), so the selection's tp and SP layout is checked
against the plain computation. Each case is then its own pytest test, so a failure names the case.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from megamm.config import LlavaConfig, ProjectorConfig
from megamm.models.llava import LlavaModel, average_loss
from megamm.parallel.grads import allreduce_sequence_parallel_grads
from megamm.parallel.params import param_specs
from megamm.parallel.sharding import gather_master
from megamm.parallel.state import ParallelState, initialize_parallel_state
from tests.distributed import run_distributed
from tests.tiny import language_config, llava_config, make_batch, vision_config

SEED = 1234
TOLERANCE = 1e-5


def _case_config(name: str) -> tuple[LlavaConfig, list[int]]:
    """The model config and images per sample of each case."""
    if name == "gqa":
        return llava_config(), [1, 2]
    if name == "text_only_sample":
        return llava_config(), [2, 0]
    if name == "no_images":
        return llava_config(), [0, 0]
    if name == "freeze_stage1":
        return llava_config(freeze_vision=True, freeze_language=True), [1, 1]
    if name == "freeze_stage2":
        return llava_config(freeze_vision=True), [1, 0]
    if name == "mha_tied_pixel_shuffle_linear":
        config = llava_config(
            language=replace(
                language_config(num_query_groups=None), tie_word_embeddings=True, make_vocab_size_divisible_by=128
            ),
            projector=ProjectorConfig(type="linear", pixel_shuffle=True),
        )
        return config, [1, 1]
    if name == "siglip_layernorm_lm":
        vision = replace(vision_config(activation="gelu_tanh"), class_token=False, pre_norm=False)
        language = language_config(normalization="layernorm", add_bias_linear=True, activation="gelu")
        return llava_config(vision=vision, language=language), [1, 1]
    raise KeyError(name)


CASES = [
    "gqa",
    "text_only_sample",
    "no_images",
    "freeze_stage1",
    "freeze_stage2",
    "mha_tied_pixel_shuffle_linear",
    "siglip_layernorm_lm",
]


def _run(model: LlavaModel, batch: dict[str, Any], full_logits: bool = False) -> torch.Tensor:
    output = model(**batch, return_logits=full_logits)
    loss = average_loss(output)
    loss.backward()
    specs = param_specs(model)
    partial = [p.grad for n, p in model.named_parameters() if specs[n].sequence_partial_grad and p.grad is not None]
    allreduce_sequence_parallel_grads(partial, model.state.tp_group)
    return loss.detach()


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.norm().item()
    difference = (value - reference).norm().item()
    return difference / scale if scale > 0 else difference


def _compare(name: str, sequence_parallel: bool, reference_state: ParallelState, state: ParallelState) -> dict:
    config, images = _case_config(name)
    batch = make_batch(config, images)
    reference = LlavaModel(config, reference_state)
    reference.initialize(SEED)
    model = LlavaModel(config, state, sequence_parallel=sequence_parallel)
    model.initialize(SEED)
    reference_loss = _run(reference, batch, full_logits=True)
    loss = _run(model, batch)

    reference_params = dict(reference.named_parameters())
    specs = param_specs(model)
    worst_param, worst_grad = 0.0, 0.0
    problems = []
    for param_name, param in model.named_parameters():
        expected = reference_params[param_name]
        layout = specs[param_name].layout
        master = gather_master(param.detach(), layout, state.tp_group)
        expected_master = gather_master(expected.detach(), layout, reference_state.tp_group)
        worst_param = max(worst_param, _relative_error(master, expected_master))
        if param.requires_grad != expected.requires_grad:
            problems.append(f"{param_name}: requires_grad differs")
        if not param.requires_grad:
            if param.grad is not None:
                problems.append(f"{param_name}: frozen but has a gradient")
            continue
        if param.grad is None or expected.grad is None:
            problems.append(f"{param_name}: trainable but has no gradient")
            continue
        grad = gather_master(param.grad, layout, state.tp_group)
        expected_grad = gather_master(expected.grad, layout, reference_state.tp_group)
        worst_grad = max(worst_grad, _relative_error(grad, expected_grad))
    trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
    return {
        "loss": loss.item(),
        "reference_loss": reference_loss.item(),
        "param_error": worst_param,
        "grad_error": worst_grad,
        "problems": problems,
        "trainable": sorted(trainable),
    }


def _parity_job(tp: int) -> dict[str, dict]:
    reference_state = initialize_parallel_state(tensor_model_parallel_size=1)
    state = ParallelState.from_groups(tp=tp, pp=1, device=torch.device("cpu"))
    reference_state.seed(SEED)
    state.seed(SEED)
    results = {}
    for name in CASES:
        for sequence_parallel in (False, True):
            results[f"{name}-sp{int(sequence_parallel)}"] = _compare(name, sequence_parallel, reference_state, state)
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def parity_results(request) -> tuple[int, list[dict]]:
    tp = request.param
    return tp, run_distributed(_parity_job, tp, tp)


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("case", CASES)
def test_tensor_parallel_matches_single_process(parity_results, case: str, sequence_parallel: bool) -> None:
    tp, per_rank = parity_results
    key = f"{case}-sp{int(sequence_parallel)}"
    for rank, results in enumerate(per_rank):
        result = results[key]
        assert not result["problems"], f"tp={tp} rank {rank}: {result['problems']}"
        assert result["param_error"] == 0.0, f"tp={tp} rank {rank}: init differs from tp=1"
        loss_error = abs(result["loss"] - result["reference_loss"]) / abs(result["reference_loss"])
        assert loss_error < TOLERANCE, f"tp={tp} rank {rank}: loss {result['loss']} vs {result['reference_loss']}"
        assert result["grad_error"] < TOLERANCE, f"tp={tp} rank {rank}: gradient relative error {result['grad_error']}"
        assert result["trainable"], "the case trains nothing, so it proves nothing"
    losses = {results[key]["loss"] for results in per_rank}
    assert len(losses) == 1, f"tp ranks disagree on the loss: {losses}"


def test_freeze_cases_train_only_what_they_should(parity_results) -> None:
    """Stage 1 trains only the projector; stage 2 the projector and the language model."""
    _, per_rank = parity_results
    stage1 = set(per_rank[0]["freeze_stage1-sp0"]["trainable"])
    stage2 = set(per_rank[0]["freeze_stage2-sp0"]["trainable"])
    assert stage1 and all(name.startswith("projector.") for name in stage1)
    assert {name.split(".")[0] for name in stage2} == {"projector", "language"}
