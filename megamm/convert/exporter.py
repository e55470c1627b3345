"""A megamm checkpoint (any layout it was trained at) -> a Hugging Face directory.

Output: config.json (LlavaForConditionalGeneration, or the architecture of the export adapter
named: Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration), `model-0000i-of-0000n.safetensors` shards with
`model.safetensors.index.json`, and the tokenizer / processor files of `--tokenizer` when given.

Memory: the checkpoint's tensors are global (master) tensors, so one process reads them directly;
they are read and written one output shard at a time (`max_shard_bytes`), so about one shard is in
memory at once.

Key spelling (`key_style`): "legacy" (default) is the llava-hf spelling of the published
checkpoints (`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`), which transformers 4.46 reads as is and later versions convert on load;
"installed" is the installed transformers' in-memory spelling (e.g. `model.language_model.*`). Either
way the set of tensors is checked against the installed LlavaForConditionalGeneration, built on the
meta device (which allocates nothing), so a missing or extra tensor is caught here, not at load.

Tensors a Hugging Face model has but megamm does not (the vision tower's final LayerNorm, unused by
LLaVA) are taken from `hf_extra/` when the checkpoint came from a Hugging Face import, and
otherwise written as the tower family supplies them (an identity LayerNorm: weight 1, bias 0) and
reported.

Everything layout-specific (config.json, key spellings, refusals, fills) comes from the export
adapter (megamm.convert.adapters, `ExportAdapter`); this module only plans, splits and writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from megamm.checkpoint import format
from megamm.config import ConfigError, LlavaConfig
from megamm.config.parsing import run_config_from_dict
from megamm.config.precision import dtype_named
from megamm.config.registry import HF_ARCHITECTURES
from megamm.convert import ConversionError
from megamm.convert.adapters.base import ExportAdapter
from megamm.convert.hf_config import HfExtras
from megamm.convert.hf_keys import model_entries
from megamm.convert.writer import CheckpointReader
from megamm.models.keymap import Entry

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)
KEY_STYLES = ("legacy", "installed")


@dataclass
class ExportSummary:
    path: Path
    tensors: int = 0
    bytes: int = 0
    shards: int = 0
    filled: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)


def _load_config(reader: CheckpointReader) -> LlavaConfig:
    tree = reader.description.get("config")
    if not isinstance(tree, dict) or "model" not in tree:
        raise ConversionError(f"{reader.path / format.DESCRIPTION} holds no run config, so the model is unknown")
    language = tree["model"].get("language")
    if isinstance(language, dict) and "family" not in language:
        # Written before language families: the import recorded the Hugging Face text model type.
        legacy = (reader.description.get("hf") or {}).get("text_model_type", "llama")
        tree = {**tree, "model": {**tree["model"], "language": {**language, "family": legacy}}}
    try:
        return run_config_from_dict(tree).model
    except ConfigError as error:
        raise ConversionError(f"{reader.path / format.DESCRIPTION}: the run config does not build: {error}") from error


def _plan(reader: CheckpointReader, config: LlavaConfig) -> list[Entry]:
    entries = model_entries(config)
    names = {e.megamm for e in entries}
    saved = {k[len(format.MODEL):] for k in reader.tensors if k.startswith(format.MODEL)}
    missing = sorted(names - saved)
    problems = []
    if missing and all(name.startswith("projector.") for name in missing):
        problems.append("the checkpoint has no projector (converted from separate towers and not trained yet): "
                        "train stage 1 first")
    elif missing:
        problems.append("missing in the checkpoint: " + ", ".join(missing))
    unexpected = sorted(saved - names)
    if unexpected:
        problems.append("parameters with no Hugging Face equivalent: " + ", ".join(unexpected))
    if problems:
        raise ConversionError(f"{reader.path} cannot be exported:\n  - " + "\n  - ".join(problems))
    return entries


def _shard_groups(items: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for key, nbytes in items:
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


def export_hf(load: str | Path, out: str | Path, tokenizer: str | Path | None = None, dtype: str | None = None,
              max_shard_bytes: int = 5 * 2**30, key_style: str = "legacy", pad_token_id: int | None = None,
              architecture: str = "llava-hf") -> ExportSummary:
    """Write the checkpoint `load` as a Hugging Face directory `out` (which must not exist) in the
    layout of the export adapter `architecture`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out} exists and is not empty: choose a new output directory")
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise ConversionError(f"--tokenizer {tokenizer}: no such directory")
    reader = CheckpointReader(load)
    config = _load_config(reader)
    extras = HfExtras.from_dict(reader.description.get("hf"))
    if pad_token_id is not None:
        extras.pad_token_id = pad_token_id
    adapter = HF_ARCHITECTURES.get(architecture)
    if not isinstance(adapter, ExportAdapter):
        raise ConversionError(f"{architecture}: megamm reads this layout but does not write it")
    extra_names = sorted(k[len(format.HF_EXTRA):] for k in reader.tensors if k.startswith(format.HF_EXTRA))
    hf_config = adapter.config_to_hf(config, extras, extra_names)
    if key_style not in KEY_STYLES:
        raise ConversionError(f"key style {key_style!r}: expected one of {', '.join(KEY_STYLES)}")
    installed = adapter.installed_keys(hf_config)

    def hf_key(name: str) -> str:
        if name not in installed:
            raise ConversionError(f"{name}: the installed transformers' {architecture} model has no such tensor")
        return adapter.legacy_key(name) if key_style == "legacy" else installed[name]

    entries = _plan(reader, config)
    # Work items: ("model/<name>", its entry) and the tensors kept aside by an import ("hf_extra/<name>", None).
    work: list[tuple[str, Entry | None]] = [(format.model_key(e.megamm), e) for e in entries]
    work += [(format.HF_EXTRA + name, None) for name in extra_names]

    def out_dtype(key: str) -> torch.dtype:
        return reader.dtype(key) if dtype is None else dtype_named(dtype, "--dtype")

    model_dtype = out_dtype(format.model_key("language.embedding.weight"))
    fill = {name: t for name, t in adapter.export_fill(config, model_dtype).items() if name not in extra_names}
    sizes = [(key, math.prod(reader.shape(key)) * out_dtype(key).itemsize) for key, _ in work]
    groups = _shard_groups(sizes, max_shard_bytes)
    entry_of = dict(work)
    staging = Path(str(out) + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    summary = ExportSummary(out, shards=len(groups))
    weight_map: dict[str, str] = {}
    written: set[str] = set()
    for index, keys in enumerate(groups, start=1):
        shard_name = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for key, value in reader.read(keys).items():
            entry = entry_of[key]
            value = value.to(out_dtype(key))
            if entry is None:
                pieces = {key[len(format.HF_EXTRA):]: value}
            else:
                pieces = dict(zip(entry.parts, value.split(entry.split_rows(value.shape[0]), dim=0)))
            for name, piece in pieces.items():
                tensors[hf_key(name)] = piece.contiguous()
                written.add(name)
        if index == len(groups):
            for name, tensor in fill.items():
                tensors[hf_key(name)] = tensor
                summary.filled.append(hf_key(name))
        for key, tensor in tensors.items():
            weight_map[key] = shard_name
            summary.bytes += tensor.numel() * tensor.element_size()
        save_file(tensors, str(staging / shard_name), metadata={"format": "pt"})
        summary.tensors += len(tensors)
        del tensors
    absent = sorted(set(installed) - written - set(fill))
    if config.language.tie_word_embeddings:
        absent = [n for n in absent if n != "text.lm_head.weight"]
    if absent:
        raise ConversionError(f"internal: tensors of the {architecture} model not written: {absent}")
    index_tree = {"metadata": {"total_size": summary.bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index_tree, indent=2) + "\n")
    hf_config["torch_dtype"] = str(model_dtype).removeprefix("torch.")
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer is not None:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer) / name
            if source.is_file():
                shutil.copy2(source, staging / name)
                summary.copied.append(name)
        if not summary.copied:
            raise ConversionError(f"--tokenizer {tokenizer}: none of {', '.join(TOKENIZER_FILES)} found")
    if out.exists():
        out.rmdir()
    os.replace(staging, out)
    return summary
