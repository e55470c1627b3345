"""The Qwen2-VL / Qwen2.5-VL vision tower equals transformers' (random tiny towers, weights copied
through the family's key map) and its tensor- and sequence-parallel runs equal the single process.

Inputs: two images of transposed shapes and a 2-frame video, so the 2D rotary axes, the per-image
(and per-frame) attention segments and the windows (2x2 merged tokens, cut short at the edges)
all change the result.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from megamm.config import ConfigError, LlavaConfig, ParallelConfig
from megamm.config.parsing import run_config_from_dict, run_config_to_dict
from megamm.config.run import RunConfig
from megamm.models.native_vision import NativeResolutionTower
from megamm.models.patch_grids import frame_lengths, grid_list, patch_positions, window_order
from megamm.models.towers import family_for_hf_type, tower_family
from megamm.models.towers.qwen2_vl import canonical_name
from megamm.parallel.grads import allreduce_sequence_parallel_grads
from megamm.parallel.params import param_specs
from megamm.parallel.sharding import gather_master, shard_master
from megamm.parallel.state import ParallelState, initialize_parallel_state
from megamm.transformer.segments import Segments
from tests.distributed import run_distributed
from tests.tiny import language_config, llava_config

GRIDS = [[1, 4, 6], [1, 6, 4], [2, 4, 4]]
PATCH, TEMPORAL, CHANNELS = 4, 2, 3
TOLERANCE = 1e-5
FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def _hf_tower(family: str) -> torch.nn.Module:
    """A random tiny transformers tower: 6 heads of 8 channels, so tp=2 and tp=3 both split it."""
    common = {"depth": 4, "num_heads": 6, "patch_size": PATCH, "temporal_patch_size": TEMPORAL,
              "in_channels": CHANNELS, "spatial_merge_size": 2, "initializer_range": 0.5}
    if family == "qwen2_vl":
        config = Qwen2VLVisionConfig(embed_dim=48, hidden_size=40, mlp_ratio=2, **common)
        model = Qwen2VisionTransformerPretrainedModel(config)
    else:
        # window_size 16 pixels = 2 merged tokens of 2x2 patches of 4 pixels; layers 1 and 3 are full.
        config = Qwen2_5_VLVisionConfig(hidden_size=48, intermediate_size=96, out_hidden_size=40, window_size=16,
                                        fullatt_block_indexes=[1, 3], **common)
        model = Qwen2_5_VisionTransformerPretrainedModel(config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():  # norms and biases too, so none is the identity
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    grids = torch.tensor(GRIDS)
    patches = int((grids[:, 0] * grids[:, 1] * grids[:, 2]).sum())
    values = torch.randn(patches, CHANNELS * TEMPORAL * PATCH * PATCH, generator=torch.Generator().manual_seed(3))
    return values, grids


def _megamm_tower(family: str, hf: torch.nn.Module, state: ParallelState, sequence_parallel: bool = False):
    """The family's tower on `state`, holding `hf`'s weights (through the key map, sharded for tp)."""
    vision = tower_family(family).config_from_hf(hf.config)
    assert vision.problems(ParallelConfig(tensor_model_parallel_size=state.tp_size)) == []
    assert tower_family(family).problems(vision) == []
    tower = NativeResolutionTower(vision, state, sequence_parallel)
    canonical = {canonical_name("visual." + key): value for key, value in hf.state_dict().items()}
    params, specs = dict(tower.named_parameters()), param_specs(tower)
    entries = tower_family(family).entries(vision)
    assert sorted(e.megamm for e in entries) == sorted("vision." + name for name in params)
    assert sorted(part for e in entries for part in e.parts) == sorted(canonical)
    with torch.no_grad():
        for entry in entries:
            name = entry.megamm.removeprefix("vision.")
            master = torch.cat([canonical[part] for part in entry.parts])
            params[name].copy_(shard_master(master, specs[name].layout, state.tp_rank, state.tp_size))
    return tower


def _loss_weights(rows: int, width: int) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(11))


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


def test_grid_geometry_matches_transformers() -> None:
    grids = torch.tensor(GRIDS)
    grid = grid_list(grids)
    assert torch.equal(patch_positions(grid, 2), get_vision_position_ids(grids, 2))
    cu = get_vision_cu_seqlens(grids)
    assert frame_lengths(grid) == (cu[1:] - cu[:-1]).tolist()
    order, lengths = window_order(grid, merge=2, window=2)
    hf_order, hf_cu = get_vision_window_index(grids, spatial_merge_size=2, window_size=16, patch_size=PATCH)
    assert torch.equal(order, hf_order)
    assert lengths == (hf_cu[1:] - hf_cu[:-1]).tolist()
    assert len(lengths) > len(frame_lengths(grid)), "the windows must split the frames"


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_equals_transformers(family: str) -> None:
    """Forward and the gradient of every weight, tp=1, against transformers."""
    hf = _hf_tower(family)
    state = ParallelState()
    tower = _megamm_tower(family, hf, state)
    values, grids = _inputs()
    expected = hf(values, grids).pooler_output
    output = tower(values, grids)
    assert output.shape == (values.shape[0] // 4, 40)
    torch.testing.assert_close(output, expected, atol=TOLERANCE, rtol=TOLERANCE)

    weights = _loss_weights(*expected.shape)
    (expected * weights).sum().backward()
    (output * weights).sum().backward()
    hf_grads = {canonical_name("visual." + k): p.grad for k, p in hf.named_parameters()}
    params = dict(tower.named_parameters())
    for entry in tower_family(family).entries(tower.config):
        expected_grad = torch.cat([hf_grads[part] for part in entry.parts])
        grad = params[entry.megamm.removeprefix("vision.")].grad
        assert _relative_error(grad, expected_grad) < TOLERANCE, entry.megamm


def test_bad_inputs_are_refused_with_what_is_wrong() -> None:
    tower = _megamm_tower("qwen2_vl", _hf_tower("qwen2_vl"), ParallelState())
    values, grids = _inputs()
    with pytest.raises(ValueError, match="the grids cover 80 patches but patches has 79 rows"):
        tower(values[:-1], grids)
    with pytest.raises(ValueError, match=r"h, w divisible by spatial_merge_size 2"):
        tower(values[:78], torch.tensor([[1, 3, 26]]))
    with pytest.raises(ValueError, match=r"expects \[patches, 96\]"):
        tower(values[:, :-1], grids)


def test_native_config_problems_are_listed() -> None:
    vision = tower_family("qwen2_5_vl").config_from_hf(_hf_tower("qwen2_5_vl").config)
    broken = replace(vision, native_resolution=replace(vision.native_resolution, fullatt_block_indexes=(1, 4),
                                                        window_size=4),
                     transformer=replace(vision.transformer, position_embedding="learned"))
    assert broken.problems(ParallelConfig()) == [
        ("vision.native_resolution.window_size 4 must cover at least one merged token "
        "(patch_size x spatial_merge_size = 8 pixels)"),
        "vision.native_resolution.fullatt_block_indexes [4] out of range for 4 layers",
        ("vision.transformer.position_embedding must be 'rope' for a native-resolution tower (2D rotary over the "
        "patch grid), got 'learned'"),
    ]
    assert tower_family("qwen2_vl").problems(vision) == [
        ("vision.transformer (normalization, activation, add_bias_linear) = ('rmsnorm', 'swiglu', True): the "
        "qwen2_vl tower has ('layernorm', 'quick_gelu', True)"),
        "vision.native_resolution.tokens_per_second: the qwen2_vl tower has none",
        "vision.native_resolution.window_size: the qwen2_vl tower has no windows",
    ]
    llava = LlavaConfig(vision=vision, language=language_config())
    assert llava.problems(ParallelConfig()) == [
        ("projector: the qwen2_5_vl tower's patch merger is its projector (vision.native_resolution); set "
         "projector to null"),
        ("language.mrope_section: the qwen2_5_vl tower's tokens are placed by M-RoPE (temporal, height, width "
         "positions); set it (Qwen2-VL: [16, 24, 24] for head_dim 128)"),
        ("vision.native_resolution.out_hidden_size 40 must equal language.transformer.hidden_size 64 (the merger "
         "writes language embeddings)"),
    ]
    assert LlavaConfig(vision=llava_config().vision, language=language_config(), projector=None).problems(
        ParallelConfig()) == [("projector: the clip tower needs a projector (only a native-resolution tower merges "
                              "its patches itself)")]
    # The ViT converters do not take a Qwen2-VL directory for a CLIP-like tower.
    assert family_for_hf_type("qwen2_vl") is None


def _parity_job(tp: int, cases: list[tuple[str, bool]]) -> dict[str, dict]:
    reference_state = initialize_parallel_state(tensor_model_parallel_size=1)
    state = ParallelState.from_groups(tp=tp, pp=1, device=torch.device("cpu"))
    values, grids = _inputs()
    results = {}
    for family, sequence_parallel in cases:
        hf = _hf_tower(family)
        reference = _megamm_tower(family, hf, reference_state)
        tower = _megamm_tower(family, hf, state, sequence_parallel)
        runs = []
        for model in (reference, tower):
            output = model(values, grids)
            (output * _loss_weights(*output.shape)).sum().backward()
            specs = param_specs(model)
            partial = [p.grad for n, p in model.named_parameters() if specs[n].sequence_partial_grad]
            allreduce_sequence_parallel_grads(partial, model.state.tp_group)
            grads = {n: gather_master(p.grad, specs[n].layout, model.state.tp_group)
                     for n, p in model.named_parameters()}
            runs.append((output.detach(), grads))
        (ref_out, ref_grads), (out, grads) = runs
        results[f"{family}-sp{int(sequence_parallel)}"] = {
            "output_error": (out - ref_out).abs().max().item(),
            "grad_errors": {n: _relative_error(grads[n], ref_grads[n]) for n in ref_grads},
        }
    return results


@pytest.mark.slow
@pytest.mark.parametrize(("tp", "cases"), [
    (2, [(family, sp) for family in FAMILIES for sp in (False, True)]),
    # 80 patches over 3 ranks: sequence parallelism pads the sequence (a segment of its own).
    (3, [("qwen2_5_vl", True)]),
], ids=["tp2", "tp3-sp-padded"])
def test_tensor_parallel_tower_matches_single_process(tp: int, cases: list[tuple[str, bool]]) -> None:
    for rank, results in enumerate(run_distributed(_parity_job, tp, tp, cases)):
        assert set(results) == {f"{family}-sp{int(sp)}" for family, sp in cases}
        for key, result in results.items():
            assert result["output_error"] < TOLERANCE, f"{key} rank {rank}: output differs by {result['output_error']}"
            worst = max(result["grad_errors"].items(), key=lambda item: item[1])
            assert worst[1] < TOLERANCE, f"{key} rank {rank}: gradient of {worst[0]} differs by {worst[1]}"


def test_segments_mask_and_boundaries() -> None:
    segments = Segments((2, 1, 3))
    assert segments.cumulative(torch.device("cpu")).tolist() == [0, 2, 3, 6]
    expected = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                             [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(segments.mask(torch.device("cpu")), expected[None, None])
    # fp32 on the CPU always takes the mask (the variable-length kernel is CUDA, half precision).
    assert not segments.uses_varlen(torch.zeros(1, 2, 6, 8), dropout=0.0)
    with pytest.raises(ValueError, match="segment lengths must be >= 1"):
        Segments((2, 0))


def test_native_vision_config_round_trips_through_a_saved_config() -> None:
    """megamm.json holds the section as JSON (tuples as lists); reading it back gives the same config."""
    vision = tower_family("qwen2_5_vl").config_from_hf(_hf_tower("qwen2_5_vl").config)
    run = RunConfig(model=LlavaConfig(vision=vision, language=language_config()))
    tree = json.loads(json.dumps(run_config_to_dict(run)))
    assert tree["model"]["vision"]["native_resolution"]["fullatt_block_indexes"] == [1, 3]
    assert run_config_from_dict(tree).model.vision == vision
    tree["model"]["vision"]["native_resolution"]["fullatt_block_indexes"] = ["1"]
    with pytest.raises(ConfigError, match=r"config.model.vision.native_resolution.fullatt_block_indexes: expected"):
        run_config_from_dict(tree)


def test_config_from_hf_reads_the_full_model_and_refuses_the_other_family() -> None:
    hf = _hf_tower("qwen2_5_vl")
    full = Qwen2_5_VLConfig(vision_config=hf.config.to_dict())
    family = tower_family("qwen2_5_vl")
    assert family.config_from_hf(full) == family.config_from_hf(hf.config)
    with pytest.raises(ValueError, match="a qwen2_vl tower reads a 'qwen2_vl_vision' .* got model_type "
                                         "'qwen2_5_vl_vision'"):
        tower_family("qwen2_vl").config_from_hf(hf.config)
