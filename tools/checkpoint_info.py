"""Describe a megamm checkpoint without loading it: what run wrote it, at which layout, and what it holds.

    python tools/checkpoint_info.py <checkpoint dir | save dir with latest> [--tensors] [--json] [--verify]

It reads only the checkpoint's description (`megamm.json`) and DCP's metadata (`.metadata`, through
`megamm.checkpoint.dcp_io.SafeFileSystemReader`, which never unpickles anything but DCP's own
metadata classes), so it runs on any machine, without torch.distributed and without reading the
shard files. Use it to check what a `--load` would resume (iteration, layout, optimizer state
present or not), how big the state is, and which shapes a model must have to load it.

Tensors are grouped by key prefix (`model/`, `optim/master/`, `optim/exp_avg/`, `optim/exp_avg_sq/`,
`optim/`, `train/`, `rng/`). Sizes are logical (elements x dtype size, from the metadata); the
on-disk size of the directory is printed beside them. By default the model tensors are listed and
the other groups summarized; `--tensors` lists every tensor, `--json` prints everything (every
tensor included) as one JSON object. Exit status 2 when the directory is not a readable checkpoint.

`--verify` checks the checkpoint instead (megamm.checkpoint.audit): the size and checksum of every
file against the description, the metadata, every tensor's chunks and the shard bytes they need.
It reads every file once; it prints `ok` and exits 0, or prints each problem and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from megamm.checkpoint import dcp_io, format
from megamm.checkpoint.audit import audit
from megamm.config.precision import precision_name


class CheckpointInfoError(Exception):
    """The directory is not a readable megamm checkpoint (reported with exit status 2)."""


GROUP_ORDER = (format.MODEL, *(format.optimizer_key(kind, "") for kind in format.OPTIMIZER_TENSORS), format.OPTIMIZER,
               format.TRAIN, format.RNG)


def group_of(key: str) -> str:
    """`model/x` -> `model/`, `optim/exp_avg/x` -> `optim/exp_avg/`, `optim/step` -> `optim/`."""
    parts = key.split("/")
    if parts[0] == "optim" and len(parts) > 2:
        return f"optim/{parts[1]}/"
    return parts[0] + "/" if len(parts) > 1 else key


def _group_rank(group: str) -> tuple[int, str]:
    return (GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER), group)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _locate(directory: str | Path) -> Path:
    path = Path(directory)
    if not path.exists():
        raise CheckpointInfoError(f"{path} does not exist")
    if not path.is_dir():
        raise CheckpointInfoError(f"{path} is not a directory")
    try:
        found = format.resolve(path)
    except (FileNotFoundError, ValueError) as error:
        raise CheckpointInfoError(str(error)) from error
    if found is None:
        raise CheckpointInfoError(
            f"{path} holds no checkpoint: expected a checkpoint directory (with {format.DESCRIPTION} and "
            f".metadata) or a save directory with a '{format.LATEST}' file"
        )
    return found


def _tensor_rows(metadata: Any) -> list[dict]:
    """One row per stored tensor (or byte blob): name, shape, dtype, logical bytes."""
    blob_sizes: dict[str, int] = {}
    for index, info in (getattr(metadata, "storage_data", None) or {}).items():
        blob_sizes[index.fqn] = blob_sizes.get(index.fqn, 0) + int(getattr(info, "length", 0))
    rows = []
    for name, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            shape = [int(s) for s in entry.size]
            dtype = entry.properties.dtype
            numel = 1
            for s in shape:
                numel *= s
            rows.append({"name": name, "shape": shape, "dtype": _dtype_name(dtype),
                         "bytes": numel * _element_size(dtype)})
        elif isinstance(entry, BytesStorageMetadata):
            rows.append({"name": name, "shape": None, "dtype": "bytes", "bytes": blob_sizes.get(name, 0)})
    return rows


def _shard_files(metadata: Any, directory: Path) -> list[dict]:
    """Each file of the directory with its size, and for DCP shard files the chunks they hold."""
    chunks: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        relative = str(getattr(info, "relative_path", ""))
        chunks[relative] = chunks.get(relative, 0) + 1
    files = []
    for path in sorted(directory.iterdir()):
        if path.is_file():
            files.append({"name": path.name, "bytes": path.stat().st_size, "chunks": chunks.get(path.name, 0)})
    return files


def config_summary(tree: dict) -> dict:
    """The shapes and batch settings that matter when reading a checkpoint, from the config tree."""
    model = tree.get("model", {}) or {}
    vision, language, projector = (model.get(k, {}) or {} for k in ("vision", "language", "projector"))
    vt, lt = vision.get("transformer", {}) or {}, language.get("transformer", {}) or {}
    training = tree.get("training", {}) or {}
    precision = precision_name(bool(training.get("bf16")), bool(training.get("fp16")))
    frozen = [name for name, flag, model_flag in (("vision", "freeze_ViT", "freeze_vision"),
                                                   ("language", "freeze_LM", "freeze_language"),
                                                   ("projector", "freeze_projector", "freeze_projector"))
              if (training.get(flag) if training.get(flag) is not None else model.get(model_flag))]
    return {
        "vision": {k: vision.get(k) for k in ("image_size", "patch_size")}
        | {k: vt.get(k) for k in ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size")},
        "projector": {k: projector.get(k) for k in ("type", "pixel_shuffle")},
        "language": {k: language.get(k) for k in ("vocab_size", "make_vocab_size_divisible_by",
                                                  "tie_word_embeddings")}
        | {k: lt.get(k) for k in ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                                  "ffn_hidden_size")},
        "training": {k: training.get(k) for k in ("micro_batch_size", "global_batch_size", "seq_length",
                                                  "train_iters", "use_distributed_optimizer")},
        "precision": precision,
        "frozen": frozen,
    }


def describe(directory: str | Path) -> dict:
    """Everything this tool reports about the checkpoint `directory` names, as a JSON-ready dict."""
    path = _locate(directory)
    try:
        description = format.read_description(path)
    except (FileNotFoundError, format.CheckpointFormatError) as error:
        raise CheckpointInfoError(f"cannot read the description: {error}") from error
    try:
        metadata = dcp_io.SafeFileSystemReader(path).read_metadata()
    except (FileNotFoundError, format.CheckpointFormatError) as error:
        raise CheckpointInfoError(f"{path}: cannot read the DCP metadata: {error}") from error
    groups: dict[str, dict] = {}
    for row in _tensor_rows(metadata):
        group = groups.setdefault(group_of(row["name"]), {"count": 0, "bytes": 0, "tensors": []})
        group["count"] += 1
        group["bytes"] += row["bytes"]
        group["tensors"].append(row)
    ordered = [{"group": name, **groups[name]} for name in sorted(groups, key=_group_rank)]
    files = _shard_files(metadata, path)
    has_optimizer = any(g["group"].startswith(format.OPTIMIZER) for g in ordered)
    return {
        "path": str(path),
        "format": description.get("format"),
        "iteration": description.get("iteration"),
        "megamm_version": description.get("megamm_version"),
        "torch_version": description.get("torch_version"),
        "saved_at": description.get("saved_at"),
        "layout": description.get("layout"),
        "optimizer": description.get("optimizer"),
        "has_optimizer_state": has_optimizer and description.get("optimizer") != "none",
        "resharded_from": description.get("resharded_from"),
        "config": config_summary(description.get("config") or {}),
        "groups": ordered,
        "tensor_count": sum(g["count"] for g in ordered),
        "total_bytes": sum(g["bytes"] for g in ordered),
        "disk_bytes": sum(f["bytes"] for f in files),
        "files": files,
    }


# ---- text report ---------------------------------------------------------------------------------


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _layout_text(layout: dict | None) -> str:
    if not layout:
        return "unknown (no layout in the description)"
    sp = "on" if layout.get("sequence_parallel") else "off"
    cp = f" x cp {layout['cp']}" if layout.get("cp", 1) > 1 else ""
    return (f"world {layout.get('world_size')} = tp {layout.get('tp')}{cp} x pp {layout.get('pp')} x dp "
            f"{layout.get('dp')}, {layout.get('virtual_stages')} virtual stage(s) per pipeline stage, "
            f"sequence parallel {sp}")


def _optimizer_text(info: dict) -> str:
    kind = info["optimizer"]
    if kind == "none" or not info["has_optimizer_state"]:
        return "none: model weights and progress only (resume with --no-load-optim)"
    return f"{kind} (AdamW: fp32 master weights and moments, stored under global keys)"


def _config_lines(summary: dict) -> list[str]:
    v, p, lang, t = summary["vision"], summary["projector"], summary["language"], summary["training"]
    groups = f", {lang['num_query_groups']} kv groups" if lang.get("num_query_groups") else ""
    tied = ", tied embeddings" if lang.get("tie_word_embeddings") else ""
    shuffle = " with pixel shuffle" if p.get("pixel_shuffle") else ""
    vision = (f"ViT {v['image_size']} px / patch {v['patch_size']}, hidden {v['hidden_size']}, "
              f"{v['num_layers']} layers, {v['num_attention_heads']} heads, ffn {v['ffn_hidden_size']}")
    language = (f"vocab {lang['vocab_size']}, hidden {lang['hidden_size']}, {lang['num_layers']} layers, "
                f"{lang['num_attention_heads']} heads{groups}, ffn {lang['ffn_hidden_size']}{tied}")
    batches = (f"micro {t['micro_batch_size']}, global {t['global_batch_size']}, seq length {t['seq_length']}, "
               f"train iters {t['train_iters']}")
    frozen = f", frozen: {', '.join(summary['frozen'])}" if summary["frozen"] else ""
    lines = [
        f"  vision      {vision}",
        f"  projector   {p['type']}{shuffle}",
        f"  language    {language}",
        f"  batches     {batches}",
        f"  precision   {summary['precision']}{frozen}",
    ]
    return lines


def report(info: dict, all_tensors: bool) -> str:
    lines = [
        f"checkpoint  {info['path']}",
        f"iteration   {info['iteration']}",
        f"saved at    {info['saved_at']}",
        f"versions    megamm {info['megamm_version']}, torch {info['torch_version']} (format {info['format']})",
        f"layout      {_layout_text(info['layout'])}",
        f"optimizer   {_optimizer_text(info)}",
    ]
    if info.get("resharded_from"):
        lines.append(f"resharded   from {info['resharded_from']}")
    lines += ["config", *_config_lines(info["config"]), ""]
    rows = [g for g in info["groups"] if all_tensors or g["group"] == format.MODEL]
    if rows:
        name_width = max(len(t["name"]) for g in rows for t in g["tensors"])
        name_width = max(name_width, len("name"))
        header = f"{'name':<{name_width}}  {'shape':<18}  {'dtype':<8}  {'bytes':>14}"
        for group in rows:
            lines += [f"{group['group']}  ({group['count']} tensors, {human(group['bytes'])})", header]
            for t in group["tensors"]:
                shape = "x".join(map(str, t["shape"])) if t["shape"] is not None else "-"
                lines.append(f"{t['name']:<{name_width}}  {'[' + shape + ']':<18}  {t['dtype']:<8}  {t['bytes']:>14,}")
            lines.append("")
    lines.append(f"{'group':<20}  {'tensors':>8}  {'bytes':>16}  {'':>10}")
    for group in info["groups"]:
        lines.append(f"{group['group']:<20}  {group['count']:>8,}  {group['bytes']:>16,}  {human(group['bytes']):>10}")
    lines.append(f"{'total (logical)':<20}  {info['tensor_count']:>8,}  {info['total_bytes']:>16,}  "
                 f"{human(info['total_bytes']):>10}")
    shards = [f for f in info["files"] if f["chunks"]]
    lines.append(f"{'on disk':<20}  {'':>8}  {info['disk_bytes']:>16,}  {human(info['disk_bytes']):>10}  "
                 f"({len(info['files'])} files, {len(shards)} shard files: "
                 + ", ".join(f"{f['name']} {human(f['bytes'])}" for f in shards) + ")")
    return "\n".join(lines)


def verify(directory: str) -> int:
    """`--verify`: 0 and `ok` for a sound checkpoint, 1 and each problem otherwise, 2 for no checkpoint."""
    try:
        path = _locate(directory)
    except CheckpointInfoError as error:
        print(f"checkpoint_info: {error}", file=sys.stderr)
        return 2
    problems = audit(path)
    if problems:
        print(f"checkpoint_info: {path} failed verification:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"{path}: ok (every file matches {format.DESCRIPTION}'s checksums, every tensor's chunks are stored)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="checkpoint_info.py",
        description="Describe a megamm checkpoint (iteration, layout, config, tensors and sizes) without loading it.",
    )
    parser.add_argument("directory", help="a checkpoint directory (iter_NNNNNNN) or a --save directory with 'latest'")
    parser.add_argument("--tensors", action="store_true", help="list every tensor (default: model tensors only)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (every tensor included)")
    parser.add_argument("--verify", action="store_true",
                        help="check every file against the description's checksums and the metadata; exit 1 "
                             "naming each problem")
    args = parser.parse_args(argv)
    if args.verify:
        return verify(args.directory)
    try:
        info = describe(args.directory)
    except CheckpointInfoError as error:
        print(f"checkpoint_info: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(report(info, args.tensors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
