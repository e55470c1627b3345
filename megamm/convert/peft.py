"""LoRA / DoRA adapters <-> Hugging Face PEFT adapter directories.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, whose keys
are the adapted modules' names in the Hugging Face model PEFT wraps, e.g. for
LlavaForConditionalGeneration under the installed transformers

    base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]
    base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_magnitude_vector   [out] (DoRA)

(PEFT's saved form drops the adapter name, "default"). megamm's adapter of a fused layer holds one
(A, B) per targeted part (megamm.parallel.lora), so q_proj / k_proj / v_proj (gate_proj / up_proj)
map onto its parts one to one; a fused layer that is one Hugging Face module (the Qwen2-VL tower's
`attn.qkv`) has one shared adapter, which is that module's. The module names come from the same key
maps as the checkpoint exporter's (megamm.convert.hf_keys, the export adapter's `installed_keys`). Which layers are adapted,
and which of their parts, is decided once, by `megamm.models.lora.apply_lora` on the model the
checkpoint describes, built on the meta device (no memory).

Export writes `target_modules` as the exact list of adapted module names (PEFT matches a name
exactly or by suffix; a bare "q_proj" would also hit the vision tower's). Import accepts what megamm
can represent: plain LoRA or DoRA with one rank and alpha (no rank / alpha patterns, no rsLoRA, no
bias training, no modules_to_save), covering a set of modules that megamm's target names reproduce
(every decoder layer alike); anything else is refused, naming the setting or the modules.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megamm.checkpoint import format
from megamm.checkpoint.adapters import adapter_description
from megamm.config import ConfigError, LlavaConfig
from megamm.config.lora import TARGET_NAMES, LoraConfig
from megamm.config.parsing import run_config_from_dict
from megamm.config.registry import HF_ARCHITECTURES
from megamm.config.run import RunConfig, training_model_config
from megamm.convert import ConversionError
from megamm.convert.hf_config import HfExtras
from megamm.convert.hf_keys import model_entries
from megamm.convert.writer import CheckpointReader, LazyTensor, write_checkpoint
from megamm.models.llava import LlavaModel
from megamm.models.lora import adapters, apply_lora, is_adapter_parameter, targeted_parts
from megamm.parallel.lora import LowRankAdapter
from megamm.parallel.state import ParallelState

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_A, LORA_B, MAGNITUDE = "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"
# PEFT settings megamm has no form for, with the value that means "not used".
UNSUPPORTED = {"use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "fan_in_fan_out": False,
               "modules_to_save": None, "layers_to_transform": None, "lora_bias": False, "target_parameters": None,
               "trainable_token_indices": None, "layer_replication": None}


def adapted_model(config: LlavaConfig, lora: LoraConfig) -> dict[str, LowRankAdapter]:
    """{layer name: its adapter} of the whole model with `lora`, built on the meta device."""
    model = LlavaModel(config, ParallelState.single("meta"))
    apply_lora(model, lora)
    return {name: layer.adapter for name, layer in adapters([model])}


def hf_modules(config: LlavaConfig, architecture: str) -> dict[tuple[str, int], str]:
    """(megamm linear layer, fused part) -> the Hugging Face module name (the installed
    transformers' in-memory spelling, which PEFT's keys follow)."""
    adapter = HF_ARCHITECTURES.get(architecture)
    # Module names follow the shapes, not the token ids: ids the checkpoint does not record are left
    # to the installed transformers' defaults (its config classes refuse None for some, e.g. Qwen2-VL's
    # vision_start_token_id).
    tree = adapter.config_to_hf(config, HfExtras.from_dict(None), [])
    installed = adapter.installed_keys({k: v for k, v in tree.items() if v is not None})
    out = {}
    for entry in model_entries(config):
        if entry.megamm.endswith(".weight"):
            for part, name in enumerate(entry.parts):
                if name in installed:
                    out[(entry.megamm.removesuffix(".weight"), part)] = installed[name].removesuffix(".weight")
    return out


def module_parts(adapter: LowRankAdapter) -> tuple[int, ...]:
    """The Hugging Face modules of an adapted layer, as part indices of its key map entry: the
    targeted parts, or part 0, the one module of a shared adapter's layer."""
    return (0,) if adapter.shared else adapter.targeted


def _per_module(adapter: LowRankAdapter, kind: str, value: torch.Tensor) -> list[torch.Tensor]:
    """A whole adapter tensor (`lora_a`, `lora_b`, `magnitude`) -> one tensor per Hugging Face module."""
    if adapter.shared:
        return [value]
    if kind == "lora_a":
        return list(value.split(adapter.rank, dim=0))
    return list(value.split([adapter.out_parts[j] for j in adapter.targeted], dim=0))


def _peft_config(lora: LoraConfig, modules: list[str]) -> dict:
    return {"peft_type": "LORA", "task_type": None, "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": sorted(modules), "use_dora": lora.dora,
            "init_lora_weights": True, "base_model_name_or_path": None, "inference_mode": True, **UNSUPPORTED}


def _publish_directory(staging: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    os.replace(staging, out)


def _new_directory(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out} exists and is not empty: choose a new output directory")
    staging = Path(str(out) + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def read_lora_run(reader: CheckpointReader) -> RunConfig:
    """The run config of LoRA checkpoint `reader` (ConversionError when it is not one)."""
    tree = reader.description.get("config")
    if not format.holds_trainable_only(reader.description) or not isinstance(tree, dict):
        raise ConversionError(f"{reader.path}: not a LoRA run's checkpoint (its {format.DESCRIPTION} does not say "
                              f"\"contents\": \"trainable\")")
    try:
        run = run_config_from_dict(tree)
    except ConfigError as error:
        raise ConversionError(f"{reader.path / format.DESCRIPTION}: the run config does not build: {error}") from error
    if run.training.lora is None:
        raise ConversionError(f"{reader.path / format.DESCRIPTION}: the run config has no --lora-rank")
    return run


def export_peft(load: str | Path, out: str | Path, architecture: str = "llava-hf") -> Path:
    """Write the adapters of LoRA checkpoint `load` as a PEFT adapter directory `out` (new)."""
    out = Path(out)
    reader = CheckpointReader(load)
    run = read_lora_run(reader)
    lora, config = run.training.lora, training_model_config(run)
    saved = {k[len(format.MODEL):] for k in reader.tensors if k.startswith(format.MODEL)}
    trained_whole = sorted(n for n in saved if not is_adapter_parameter(n))
    if trained_whole:
        raise ConversionError(f"{reader.path} also trained whole tensors ({', '.join(trained_whole)}), which a PEFT "
                              "adapter does not hold; merge the checkpoint (tools/merge_lora.py merge) and export "
                              "the merged model instead")
    layers, modules = adapted_model(config, lora), hf_modules(config, architecture)
    tensors: dict[str, torch.Tensor] = {}
    names = []
    for layer, adapter in layers.items():
        keys = {kind: format.model_key(f"{layer}.adapter.{kind}") for kind in ("lora_a", "lora_b", "magnitude")
                if kind != "magnitude" or adapter.magnitude is not None}
        missing = [key for key in keys.values() if key not in reader.tensors]
        if missing:
            raise ConversionError(f"{reader.path}: missing adapter tensors {', '.join(missing)}")
        values = reader.read(keys.values())
        per_module = {kind: _per_module(adapter, kind, values[key]) for kind, key in keys.items()}
        for t, part in enumerate(module_parts(adapter)):
            if (layer, part) not in modules:
                raise ConversionError(f"{layer}: part {part} has no module in the {architecture} layout")
            module = modules[(layer, part)]
            names.append(module)
            for kind, peft_kind in (("lora_a", LORA_A), ("lora_b", LORA_B), ("magnitude", MAGNITUDE)):
                if kind in per_module:
                    tensors[f"{PEFT_PREFIX}{module}.{peft_kind}"] = per_module[kind][t].contiguous()
    staging = _new_directory(out)
    save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (staging / ADAPTER_CONFIG).write_text(json.dumps(_peft_config(lora, names), indent=2) + "\n")
    _publish_directory(staging, out)
    return out


def _check_peft_config(peft: Mapping, path: Path) -> None:
    problems = []
    if peft.get("peft_type") != "LORA":
        problems.append(f"peft_type {peft.get('peft_type')!r}: megamm imports LORA adapters")
    for key, unused in UNSUPPORTED.items():
        value = peft.get(key, unused)
        if value not in (unused, None, {}, [], False):
            problems.append(f"{key} = {value!r}: megamm has no form for it")
    if problems:
        raise ConversionError(f"{path / ADAPTER_CONFIG} cannot be imported:\n  - " + "\n  - ".join(problems))


def _targets(selected: set[tuple[str, int]], parts_of: Mapping[str, int]) -> tuple[str, ...]:
    """The megamm target names that select any of the (layer, part) pairs a PEFT adapter adapts
    (whether they select exactly those is checked by the caller)."""
    return tuple(name for name in TARGET_NAMES
                 if any(part in targeted_parts(layer, parts_of[layer], (name,)) for layer, part in selected))


def import_peft(peft_dir: str | Path, pretrained: str | Path, save: str | Path,
                architecture: str = "llava-hf") -> Path:
    """A PEFT adapter directory for the Hugging Face form of base checkpoint `pretrained` -> a
    megamm LoRA checkpoint in `save` (iteration 0, no optimizer state), which a LoRA run resumes
    with `--load save --no-load-optim --pretrained-checkpoint pretrained` and tools/merge_lora.py merges."""
    peft_dir = Path(peft_dir)
    try:
        peft = json.loads((peft_dir / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"{peft_dir / ADAPTER_CONFIG}: {error}") from error
    _check_peft_config(peft, peft_dir)
    base = CheckpointReader(pretrained)
    if format.holds_trainable_only(base.description):
        raise ConversionError(f"--pretrained-checkpoint {pretrained} is a LoRA run's checkpoint, not a base model")
    tree = base.description.get("config")
    try:
        config = run_config_from_dict(tree).model
    except (ConfigError, TypeError) as error:
        raise ConversionError(f"{base.path / format.DESCRIPTION}: the run config does not build: {error}") from error
    weights = peft_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ConversionError(f"{weights}: no such file (megamm reads safetensors adapters only)")
    with safe_open(str(weights), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no iterator
    modules = hf_modules(config, architecture)
    by_module = {module: pair for pair, module in modules.items()}
    parts_of: dict[str, int] = {}
    for layer, part in modules:
        parts_of[layer] = max(parts_of.get(layer, 0), part + 1)
    selected: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        module, kind = _split_key(key)
        if module not in by_module or kind not in (LORA_A, LORA_B, MAGNITUDE):
            unknown.append(key)
            continue
        selected.setdefault(by_module[module], {})[kind] = value
    if unknown:
        raise ConversionError(f"{weights}: keys with no megamm adapter: {', '.join(sorted(unknown)[:8])}"
                              + (" ..." if len(unknown) > 8 else ""))
    dora = bool(peft.get("use_dora", False))
    lora = LoraConfig(int(peft["r"]), float(peft["lora_alpha"]), float(peft.get("lora_dropout", 0.0)),
                      _targets(set(selected), parts_of), dora)
    layers = adapted_model(config, lora)
    covered = {(layer, part) for layer, adapter in layers.items() for part in module_parts(adapter)}
    if covered != set(selected):
        differ = sorted(covered ^ set(selected))[:6]
        raise ConversionError(f"{peft_dir}: its modules are not a set megamm's target names give (targets "
                              f"{','.join(lora.targets)} differ at {differ}); megamm adapts every decoder layer alike")
    out: dict[str, LazyTensor] = {}
    for layer, adapter in layers.items():
        parts = [selected[(layer, part)] for part in module_parts(adapter)]
        kinds = [LORA_A, LORA_B] + ([MAGNITUDE] if dora else [])
        for kind, name in zip(kinds, ("lora_a", "lora_b", "magnitude")):
            if any(kind not in p for p in parts):
                raise ConversionError(f"{weights}: {layer} lacks {kind} for one of its parts")
            value = torch.cat([p[kind] for p in parts], dim=0)
            param = getattr(adapter, name)
            if tuple(value.shape) != tuple(param.shape):
                raise ConversionError(f"{weights}: {layer} {kind}: shape {tuple(value.shape)}, megamm's adapter "
                                      f"needs {tuple(param.shape)} (r = {lora.rank})")
            out[f"{layer}.adapter.{name}"] = LazyTensor(tuple(value.shape), value.dtype, lambda v=value: v)
    training = {**(tree.get("training") or {}), "lora_rank": lora.rank, "lora_alpha": lora.alpha,
                "lora_dropout": lora.dropout, "lora_target_modules": [",".join(lora.targets)],
                "lora_use_dora": dora, "pretrained_checkpoint": str(pretrained)}
    layout = format.layout_signature(1, 1, 1, 1, False)
    return write_checkpoint(save, out, layout, {**tree, "training": training},
                            **adapter_description(str(pretrained)), imported_from=str(peft_dir))


def _split_key(key: str) -> tuple[str, str]:
    """`base_model.model.<module>.lora_A.weight` -> (module, "lora_A.weight")."""
    name = key.removeprefix(PEFT_PREFIX)
    for kind in (LORA_A, LORA_B, MAGNITUDE):
        if name.endswith("." + kind):
            return name[: -len(kind) - 1], kind
    return name, ""
