"""The parameter table: one ParamSpec per parameter, with the roles the parallel code relies on.

The models are built on the meta device with tp / pp sizes in the state but no process groups:
construction communicates nothing, so the records of a tp=2 or last-stage model can be read in one
process. Expected roles are written from the parameter names (what Megatron's rules say), not
read back from the code under test.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from torch import nn

from megamm.config import LlavaConfig
from megamm.models.llava import LlavaModel
from megamm.optim.optimizer import counts_in_norm
from megamm.parallel.params import ParamOwner, ParamSpec, TiedEmbedding, param_specs, specs_by_parameter
from megamm.parallel.sharding import ParamLayout, constant_init
from megamm.parallel.state import ParallelState
from megamm.transformer.norm import Norm
from tests.tiny import language_config, llava_config

META = torch.device("meta")

# Under sequence parallelism: the norms and row-parallel biases inside the (vision and language)
# transformer layers, and the language model's final norm. Not the vision pre-norm (it runs on
# the full sequence before the split) nor the projector (it computes replicated).
SEQUENCE_PARTIAL = re.compile(
    r"(encoder|decoder)\.layers\.\d+\.((input_norm|pre_mlp_norm)\.(weight|bias)|(self_attention\.proj|mlp\.fc2)\.bias)$"
    r"|^language\.final_norm\.(weight|bias)$"
)


def _biased_config(tied: bool = False) -> LlavaConfig:
    """Layernorm and linear biases in the language model too, so every kind of role occurs."""
    language = language_config(normalization="layernorm", add_bias_linear=True, activation="gelu")
    return llava_config(language=replace(language, tie_word_embeddings=tied))


def test_one_record_per_parameter_with_its_layout() -> None:
    model = LlavaModel(_biased_config(), ParallelState(tp_size=2, device=META), sequence_parallel=True)
    specs = param_specs(model)
    assert list(specs) == [name for name, _ in model.named_parameters()]
    assert all(isinstance(spec, ParamSpec) for spec in specs.values())
    qkv = specs["language.decoder.layers.0.self_attention.qkv.weight"]
    assert qkv.layout.partition_dim == 0 and qkv.layout.fused_parts == (64, 32, 32) and not qkv.tp_replicated
    assert specs["language.decoder.layers.1.mlp.fc2.weight"].layout.partition_dim == 1
    embedding = specs["language.embedding.weight"].layout
    assert embedding.master_shape == (100, 64) and embedding.padded_size == 112
    assert specs["vision.position_embedding"].tp_replicated
    by_param = specs_by_parameter([model])
    assert all(by_param[param] is specs[name] for name, param in model.named_parameters())


@pytest.mark.parametrize("sequence_parallel", [True, False])
@pytest.mark.parametrize("tp", [1, 2])
def test_sequence_parallel_partial_grads_are_marked(tp: int, sequence_parallel: bool) -> None:
    """Marked exactly when the sequence is really split (tp > 1 and sequence parallelism)."""
    model = LlavaModel(_biased_config(), ParallelState(tp_size=tp, device=META), sequence_parallel=sequence_parallel)
    marked = {name for name, spec in param_specs(model).items() if spec.sequence_partial_grad}
    expected = {name for name, _ in model.named_parameters() if SEQUENCE_PARTIAL.search(name)}
    assert "language.decoder.layers.0.mlp.fc2.bias" in expected and "vision.pre_norm.weight" not in expected
    assert marked == (expected if tp > 1 and sequence_parallel else set())


def _embedding_roles(config: LlavaConfig, pp_rank: int, pre_process: bool, post_process: bool, layers: range
                     ) -> dict[str, TiedEmbedding]:
    state = ParallelState(pp_size=2, pp_rank=pp_rank, device=META)
    model = LlavaModel(config, state, pre_process=pre_process, post_process=post_process, language_layers=layers)
    return {name: spec.tied for name, spec in param_specs(model).items() if spec.tied is not None}


def test_tied_embedding_roles() -> None:
    tied, untied = _biased_config(tied=True), _biased_config()
    assert _embedding_roles(tied, 0, True, False, range(1)) == {"language.embedding.weight": TiedEmbedding.TABLE}
    assert _embedding_roles(tied, 1, False, True, range(1, 2)) == {
        "language.embedding.weight": TiedEmbedding.OUTPUT_COPY
    }
    single = LlavaModel(tied, ParallelState(device=META))
    assert {n: s.tied for n, s in param_specs(single).items() if s.tied} == {
        "language.embedding.weight": TiedEmbedding.TABLE
    }
    assert _embedding_roles(untied, 0, True, False, range(1)) == {}
    assert _embedding_roles(untied, 1, False, True, range(1, 2)) == {}


def test_the_tied_output_copy_counts_in_the_norm_only_when_sharded() -> None:
    layout = ParamLayout((8, 4), constant_init(0.0), partition_dim=0)
    copy, table = ParamSpec(layout, tied=TiedEmbedding.OUTPUT_COPY), ParamSpec(layout, tied=TiedEmbedding.TABLE)
    state = ParallelState()
    assert not counts_in_norm(copy, state, sharded_over_dp=False)
    assert counts_in_norm(copy, state, sharded_over_dp=True)
    assert counts_in_norm(table, state, sharded_over_dp=False)
    replicated = ParamSpec(ParamLayout((4,), constant_init(0.0)))
    assert counts_in_norm(replicated, state, False)
    assert not counts_in_norm(replicated, ParallelState(tp_size=2, tp_rank=1), False)
    assert counts_in_norm(ParamSpec(layout), ParallelState(tp_size=2, tp_rank=1), False)


def test_a_parameter_without_record_is_named() -> None:
    state = ParallelState()
    model = nn.Sequential(Norm(4, "rmsnorm", 1e-5, state, False, torch.float32), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"parameter 1\.weight of Linear has no ParamSpec"):
        param_specs(model)

    class Unrecorded(ParamOwner):
        def __init__(self) -> None:
            super().__init__()
            self.create_parameter("kept", ParamSpec(ParamLayout((2,), constant_init(0.0))), state, torch.float32)
            self.register_parameter("stray", nn.Parameter(torch.zeros(2)))

    with pytest.raises(TypeError, match="parameter stray of Unrecorded has no ParamSpec"):
        param_specs(Unrecorded())
