"""Fold a LoRA run's adapters into its base: a plain megamm checkpoint, in one process.

The merged checkpoint is what the base would be had the run trained the full weights: every
parameter under its usual name (no adapter tensors), the run config without the LoRA flags, the
base's `hf_extra/` tensors and Hugging Face fields (so `tools/convert_checkpoint.py export-hf`
writes it as the base's export would be written), iteration 0, no optimizer state. Generation,
evaluation, export and further training read it like any checkpoint.

How: the model is built at tp = pp = 1 on the CPU with the run's adapters, initialized from the
run's --seed (which is the base when the run had no --pretrained-checkpoint), the base loaded over
it, then the trained tensors, and `megamm.models.lora.merge_lora` folds `W + s B A` (DoRA: the
renormalized rows) in fp32. The whole model passes through this process's memory once.
"""

from __future__ import annotations

from pathlib import Path

from megamm.checkpoint import dcp_io, format
from megamm.checkpoint.adapters import load_pretrained, trainable_blocks
from megamm.checkpoint.blocks import BlockLoadPlanner, model_blocks
from megamm.config.parsing import run_config_to_dict
from megamm.config.run import training_model_config
from megamm.convert.peft import read_lora_run
from megamm.convert.writer import CheckpointReader, LazyTensor, write_checkpoint
from megamm.models.llava import LlavaModel
from megamm.models.lora import apply_lora, merge_lora, reset_magnitudes
from megamm.parallel.params import param_specs
from megamm.parallel.sharding import gather_master
from megamm.parallel.state import ParallelState

# The training fields of a LoRA run that a merged model no longer has.
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_use_dora",
               "pretrained_checkpoint")


def merge_adapters(load: str | Path, save: str | Path, pretrained: str | Path | None = None,
                   verify: bool = True) -> Path:
    """Merge LoRA checkpoint `load` into its base (`pretrained`, default: the base its description
    names) and write the result as iteration 0 of `save`; returns the published directory."""
    reader = CheckpointReader(load, verify)
    run = read_lora_run(reader)
    base = pretrained if pretrained is not None else reader.description.get(format.PRETRAINED)
    state = ParallelState.single()
    state.seed(run.training.seed)
    model = LlavaModel(training_model_config(run), state)
    apply_lora(model, run.training.lora)
    model.initialize(run.training.seed)
    base_reader = None
    if base:
        load_pretrained([model], base, state, verify, log=lambda _: None)
        base_reader = CheckpointReader(base, verify)
    reset_magnitudes([model])
    request = trainable_blocks(model_blocks([model], state), [model])
    fit = format.check_fit(reader.path, {k: tuple(v.shape) for k, v in request.items()},
                           reader.source.read_metadata().state_dict_metadata)
    dcp_io.load({k: v for k, v in request.items() if k in fit.keys}, reader.source, BlockLoadPlanner(), None)
    merge_lora([model])
    specs = param_specs(model)
    tensors: dict[str, LazyTensor] = {}
    for name, param in model.named_parameters():
        master = gather_master(param.detach(), specs[name].layout, None)
        tensors[name] = LazyTensor(tuple(master.shape), master.dtype, lambda m=master: m)
    hf_fields = {}
    if base_reader is not None:
        extra = [k for k in base_reader.tensors if k.startswith(format.HF_EXTRA)]
        for key, value in base_reader.read(extra).items():
            tensors[key] = LazyTensor(tuple(value.shape), value.dtype, lambda v=value: v)
        if "hf" in base_reader.description:
            hf_fields["hf"] = base_reader.description["hf"]
    tree = run_config_to_dict(run)
    tree["training"] = {k: v for k, v in tree["training"].items() if k not in LORA_FIELDS}
    layout = format.layout_signature(1, 1, 1, 1, False)
    return write_checkpoint(save, tensors, layout, tree, merged_from=str(reader.path), merged_base=base, **hf_fields)
