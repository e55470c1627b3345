"""The Qwen2-VL family's LlavaModel at tp=2, tp=2 with sequence parallelism and pp=2 equals the
single process (fp32, loss and every gradient within 1e-5 relative), without and with LoRA.

One spawned job of 2 gloo processes runs every case on the two microbatches of
`tests.tiny.native_microbatches`: images of two sizes (grids 1x4x6 and 1x6x4) and a 2x4x4 video,
padded rows with M-RoPE positions, and packed rows (block-causal mask, positions restarting at the
second sample). The pipeline run gives each stage only the keys it needs (STAGE_KEYS), so the
second stage rotates with the 3-axis position ids it receives and masks with the packed mask.

With LoRA (LORA_TARGETS: parts of the decoder's fused layers, every linear of the tower's layers,
the tower's qkv one adapter of the whole layer, and the patch merger as the projector), only the
adapters train; their B (DoRA: magnitudes) start away from the init so every adapter tensor has a
gradient. DoRA runs at tp=2 with sequence parallelism (row-parallel norms summed over tp).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megamm.config import LlavaConfig
from megamm.config.layout import stage_layers
from megamm.config.lora import LoraConfig
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.models.llava import LlavaModel
from megamm.models.lora import apply_lora, is_adapter_parameter, reset_magnitudes
from megamm.parallel.grads import allreduce_sequence_parallel_grads
from megamm.parallel.params import param_specs
from megamm.parallel.sharding import gather_master
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.pipeline.schedules import PipelineSchedule
from tests.adapters import perturb_adapters
from tests.distributed import run_distributed
from tests.tiny import NATIVE_SEQ, native_microbatches, qwen2_vl_config

SEED = 4321
TOLERANCE = 1e-5
FAMILIES = ("qwen2_vl", "qwen2_5_vl")
# What each pipeline stage is given (megamm.training.data's key lists must carry the same).
FIRST_STAGE = ("input_ids", "pixel_values", "image_grid_thw", "images_per_sample", "pixel_values_videos",
               "video_grid_thw", "videos_per_sample")
LAST_STAGE = ("labels",)
EVERY_STAGE = ("position_ids", "attention_mask")
LORA_TARGETS = "q_proj,v_proj,o_proj,up_proj,down_proj,vision,projector"
LORA_CASES = ("lora-tp2", "lora-tp2+sp", "lora-pp2")
DORA_CASES = ("dora-tp2+sp",)


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.norm().item()
    return (value - reference).norm().item() / scale if scale > 0 else (value - reference).norm().item()


def _total_tokens(microbatches: list[dict]) -> float:
    return float(sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in microbatches))


def _grads(model: LlavaModel) -> dict[str, torch.Tensor]:
    """Every gradient in the master layout (partial grads over tp summed first: sequence-parallel
    norms and biases, the adapters' replicated factors)."""
    specs = param_specs(model)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    allreduce_sequence_parallel_grads([p.grad for n, p in trained if specs[n].partial_grad_over_tp],
                                      model.state.tp_group)
    return {n: gather_master(p.grad, specs[n].layout, model.state.tp_group) for n, p in trained}


def _accumulate(model: LlavaModel, microbatches: list[dict]) -> float:
    """Loss (sum over microbatches / tokens) and its backward, microbatch by microbatch."""
    total_tokens, loss = _total_tokens(microbatches), 0.0
    for microbatch in microbatches:
        step = model(**microbatch)["loss"].sum() / total_tokens
        step.backward()
        loss += step.item()
    return loss


def _build(config: LlavaConfig, state: ParallelState, lora: LoraConfig | None, **stage) -> LlavaModel:
    """The model from SEED; with `lora`, its adapters perturbed away from their init (DoRA's
    magnitudes from the initialized base first)."""
    model = LlavaModel(config, state, **stage)
    if lora is not None:
        apply_lora(model, lora)
    model.initialize(SEED)
    if lora is not None:
        reset_magnitudes([model])
        perturb_adapters([model], state)
    return model


def _lora(config: LlavaConfig, dora: bool) -> tuple[LlavaConfig, LoraConfig]:
    """The model a LoRA run of `config` builds (the parts holding targets frozen) and its settings."""
    run = RunConfig(model=config, training=TrainingConfig(
        mock_data=True, seq_length=NATIVE_SEQ, lora_rank=4, lora_alpha=8.0, lora_target_modules=[LORA_TARGETS],
        lora_use_dora=dora))
    resolved = resolve(run, 1)
    return resolved.model, resolved.lora


def _pipeline(config, state: ParallelState, microbatches: list[dict],
              lora: LoraConfig | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    first, last = state.is_first_stage, state.is_last_stage
    (layers,) = stage_layers(config.language.transformer.num_layers, state.pp_size, state.pp_rank)
    model = _build(config, state, lora, pre_process=first, post_process=last, language_layers=layers)
    keys = (FIRST_STAGE if first else ()) + (LAST_STAGE if last else ()) + EVERY_STAGE
    staged = [{k: mb[k] for k in keys if k in mb} for mb in microbatches]
    schedule = PipelineSchedule(state, (NATIVE_SEQ, 2, config.language.transformer.hidden_size), torch.float32)
    loss = schedule([model], staged, _total_tokens(microbatches), None)
    # The tied table: the first stage's input grad plus the last stage's output-layer grad.
    if model.language.embedding.weight.requires_grad:
        dist.all_reduce(model.language.embedding.weight.grad, group=state.pp_group)
    grads = _grads(model)
    loss_tensor = loss.clone()
    dist.broadcast(loss_tensor, src=state.pp_ranks[-1], group=state.pp_group)
    return loss_tensor.item() / _total_tokens(microbatches), grads


def _parity_job() -> dict[str, dict]:
    reference_state = initialize_parallel_state(tensor_model_parallel_size=1)
    tp_state = ParallelState.from_groups(tp=2, pp=1, device=torch.device("cpu"))
    pp_state = ParallelState.from_groups(tp=1, pp=2, device=torch.device("cpu"))
    results = {}
    for family in FAMILIES:
        config = qwen2_vl_config(family)
        microbatches = native_microbatches(config)
        reference = LlavaModel(config, reference_state)
        reference.initialize(SEED)
        reference_loss = _accumulate(reference, microbatches)
        reference_grads = _grads(reference)
        runs = {}
        for sequence_parallel in (False, True):
            model = LlavaModel(config, tp_state, sequence_parallel=sequence_parallel)
            model.initialize(SEED)
            runs[f"tp2{'+sp' if sequence_parallel else ''}"] = (_accumulate(model, microbatches), _grads(model))
        runs["pp2"] = _pipeline(config, pp_state, microbatches)
        references = dict.fromkeys(runs, (reference_loss, reference_grads))
        for kind in ("lora", "dora") if family == "qwen2_vl" else ("lora",):
            lora_config, lora = _lora(config, dora=kind == "dora")
            reference = _build(lora_config, reference_state, lora)
            references.update(dict.fromkeys(LORA_CASES if kind == "lora" else DORA_CASES,
                                            (_accumulate(reference, microbatches), _grads(reference))))
            for sequence_parallel in (False, True) if kind == "lora" else (True,):
                model = _build(lora_config, tp_state, lora, sequence_parallel=sequence_parallel)
                runs[f"{kind}-tp2{'+sp' if sequence_parallel else ''}"] = (_accumulate(model, microbatches),
                                                                           _grads(model))
            if kind == "lora":
                runs["lora-pp2"] = _pipeline(lora_config, pp_state, microbatches, lora)
        for name, (loss, grads) in runs.items():
            ref_loss, ref_grads = references[name]
            results[f"{family}-{name}"] = {
                "loss": loss, "reference_loss": ref_loss,
                "grad_errors": {n: _relative(g, ref_grads[n]) for n, g in grads.items()},
                "zero_grads": [n for n, g in grads.items() if g.norm() == 0],
                "reference_trained": sorted(ref_grads),
            }
    return results


@pytest.fixture(scope="module")
def parity_results() -> list[dict]:
    return run_distributed(_parity_job, 2)


def _check_parity(parity_results: list[dict], family: str, layout: str) -> None:
    for rank, results in enumerate(parity_results):
        result = results[f"{family}-{layout}"]
        loss_error = abs(result["loss"] - result["reference_loss"]) / abs(result["reference_loss"])
        assert loss_error < TOLERANCE, f"rank {rank}: loss {result['loss']} vs {result['reference_loss']}"
        worst = max(result["grad_errors"].items(), key=lambda item: item[1])
        assert worst[1] < TOLERANCE, f"rank {rank}: gradient of {worst[0]} off by {worst[1]:.2e} (relative)"
        assert not result["zero_grads"], f"rank {rank}: parameters without gradient {result['zero_grads']}"
        if layout == "pp2":
            held = {name.split(".")[0] for name in result["grad_errors"]}
            assert held == ({"vision", "language"} if rank == 0 else {"language"})


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "tp2+sp", "pp2"])
@pytest.mark.parametrize("family", FAMILIES)
def test_qwen2_vl_family_matches_single_process(parity_results: list[dict], family: str, layout: str) -> None:
    _check_parity(parity_results, family, layout)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "layout"), [(f, c) for f in FAMILIES for c in LORA_CASES]
                         + [("qwen2_vl", c) for c in DORA_CASES])
def test_qwen2_vl_lora_matches_single_process(parity_results: list[dict], family: str, layout: str) -> None:
    """Loss and every adapter gradient as one process; only the adapters train, in every part: the
    tower's layers, the merger and the decoder."""
    _check_parity(parity_results, family, layout)
    trained = parity_results[0][f"{family}-{layout}"]["reference_trained"]
    assert trained and all(is_adapter_parameter(n) for n in trained), trained
    for part in ("vision.encoder.layers.0.", "vision.encoder.layers.1.", "vision.merger.", "language."):
        assert any(n.startswith(part) for n in trained), f"no adapter in {part}"
