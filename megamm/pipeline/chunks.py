"""The model chunks one pipeline stage holds: one LlavaModel per virtual stage, each with its
share of the language layers (megamm.config.layout) and, with LoRA, its adapters
(megamm.models.lora), deterministically initialized, its transformer layers compiled with
--torch-compile (megamm.transformer.compile)."""

from __future__ import annotations

from megamm.config.layout import stage_layers
from megamm.config.resolved import ResolvedConfig
from megamm.models.llava import LlavaModel
from megamm.models.lora import apply_lora
from megamm.parallel.state import ParallelState
from megamm.transformer.compile import compile_layers


def build_model_chunks(config: ResolvedConfig, state: ParallelState) -> list[LlavaModel]:
    """This stage's model chunks (one without virtual stages), deterministically initialized (DoRA's
    magnitudes follow the base weights once they are final: megamm.models.lora.reset_magnitudes) and,
    with --torch-compile, with every transformer layer compiled (lazily, at its first call)."""
    p, t, model_config = config.parallel, config.training, config.model
    layer_chunks = stage_layers(
        model_config.language.transformer.num_layers, state.pp_size, state.pp_rank,
        p.num_layers_per_virtual_pipeline_stage, p.decoder_first_pipeline_num_layers,
        p.decoder_last_pipeline_num_layers,
    )
    chunks = []
    for index, layers in enumerate(layer_chunks):
        chunk = LlavaModel(
            model_config, state, sequence_parallel=config.sequence_parallel,
            pre_process=state.is_first_stage and index == 0,
            post_process=state.is_last_stage and index == len(layer_chunks) - 1,
            language_layers=layers,
        )
        if config.lora is not None:
            apply_lora(chunk, config.lora)
        chunk.initialize(t.seed)
        if t.torch_compile:
            compile_layers(chunk)
        chunks.append(chunk)
    return chunks
