"""A megamm checkpoint (any layout it was trained at) -> a Hugging Face LLaVA directory.

Output: config.json (LlavaForConditionalGeneration), `model-0000i-of-0000n.safetensors` shards with
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
otherwise written as an identity-initialized LayerNorm (weight 1, bias 0) and reported.
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
from megamm.convert import ConversionError
from megamm.convert.hf_config import HfExtras, hf_config_from_llava
from megamm.convert.hf_keys import Entry, canonical_name, legacy_hf_key, model_entries
from megamm.convert.importer import DTYPES
from megamm.convert.writer import CheckpointReader

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)
# The vision tower's final LayerNorm: in every CLIP/SigLIP model, never used by LLaVA.
KEY_STYLES = ("legacy", "installed")
POST_NORM = ("vision.post_layernorm.weight", "vision.post_layernorm.bias")


@dataclass
class ExportSummary:
    path: Path
    tensors: int = 0
    bytes: int = 0
    shards: int = 0
    filled: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)


def _hf_keys(hf_config: dict) -> dict[str, str]:
    """canonical name -> key of the installed transformers' LlavaForConditionalGeneration (in memory)."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    tree = {k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")}
    config = AutoConfig.for_model("llava", **tree)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    out = {}
    for key in model.state_dict():
        name = canonical_name(key, "llava-hf")
        if name is None:
            raise ConversionError(f"transformers' LlavaForConditionalGeneration has a key {key} this exporter "
                                  f"does not know")
        out[name] = key
    return out


def _part_rows(entry: Entry, config: LlavaConfig, rows: int) -> list[int]:
    """How a fused megamm tensor splits back into its canonical parts (dim 0)."""
    if len(entry.parts) == 1:
        return [rows]
    lang = config.language.transformer
    if entry.megamm.startswith("language.") and ".qkv." in entry.megamm:
        q, kv = lang.num_attention_heads * lang.head_dim, lang.query_groups * lang.head_dim
        return [q, kv, kv]
    return [rows // len(entry.parts)] * len(entry.parts)


def _load_config(reader: CheckpointReader) -> LlavaConfig:
    tree = reader.description.get("config")
    if not isinstance(tree, dict) or "model" not in tree:
        raise ConversionError(f"{reader.path / format.DESCRIPTION} holds no run config, so the model is unknown")
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
              max_shard_bytes: int = 5 * 2**30, key_style: str = "legacy", pad_token_id: int | None = None
              ) -> ExportSummary:
    """Write the checkpoint `load` as a Hugging Face LLaVA directory `out` (which must not exist)."""
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
    hf_config = hf_config_from_llava(config, extras)
    extra_names = sorted(k[len(format.HF_EXTRA):] for k in reader.tensors if k.startswith(format.HF_EXTRA))
    if any(name.startswith("vision.head.") for name in extra_names):
        hf_config["vision_config"]["vision_use_head"] = True  # a SigLIP pooling head came with the import
    if key_style not in KEY_STYLES:
        raise ConversionError(f"key style {key_style!r}: expected one of {', '.join(KEY_STYLES)}")
    installed = _hf_keys(hf_config)

    def hf_key(name: str) -> str:
        if name not in installed:
            raise ConversionError(f"{name}: the installed transformers' LlavaForConditionalGeneration has no such tensor")
        return legacy_hf_key(name) if key_style == "legacy" else installed[name]

    entries = _plan(reader, config)
    # Work items: ("model/<name>", its entry) and the tensors kept aside by an import ("hf_extra/<name>", None).
    work: list[tuple[str, Entry | None]] = [(format.model_key(e.megamm), e) for e in entries]
    work += [(format.HF_EXTRA + name, None) for name in extra_names]
    fill = [name for name in POST_NORM if name not in extra_names]

    def out_dtype(key: str) -> torch.dtype:
        return reader.dtype(key) if dtype is None else DTYPES[dtype]

    model_dtype = out_dtype(format.model_key("language.embedding.weight"))
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
                pieces = dict(zip(entry.parts, value.split(_part_rows(entry, config, value.shape[0]), dim=0)))
            for name, piece in pieces.items():
                tensors[hf_key(name)] = piece.contiguous()
                written.add(name)
        if index == len(groups):
            for name in fill:
                tensors[hf_key(name)] = _identity_norm(name, config, model_dtype)
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
        raise ConversionError(f"internal: tensors of LlavaForConditionalGeneration not written: {absent}")
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


def _identity_norm(name: str, config: LlavaConfig, dtype: torch.dtype) -> torch.Tensor:
    hidden = config.vision.transformer.hidden_size
    if name.endswith("post_layernorm.weight"):
        return torch.ones(hidden, dtype=dtype)
    if name.endswith("post_layernorm.bias"):
        return torch.zeros(hidden, dtype=dtype)
    raise ConversionError(f"{name}: the Hugging Face model needs it, and megamm has no value for it")
