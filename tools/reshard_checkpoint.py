"""Rewrite a megamm checkpoint for another parallel layout, offline, on one machine's CPUs.

    python tools/reshard_checkpoint.py --load SRC --save DST --tensor-model-parallel-size T \\
        --pipeline-model-parallel-size P [--world-size W] [--use-distributed-optimizer] \\
        [--num-layers-per-virtual-pipeline-stage N] [--sequence-parallel] [--no-optim]

megamm does not need this tool to change layouts: a checkpoint stores every tensor under a global,
layout-independent key, and `megamm.train --load` reads any checkpoint at any tp / pp / dp size, with
the plain or the distributed optimizer, directly. What the tool is for:

- Writing the shards in the target layout's own rank files. A checkpoint's `__<rank>_0.distcp` files
  follow the layout that saved it; after resharding, each rank of the target layout reads mostly its
  own file (one sequential read per rank instead of pieces of every file), which matters on slow or
  remote file systems and before copying per-rank files to the nodes that will read them.
- Making a smaller, model-only checkpoint with `--no-optim`: the model weights and the training
  progress (iteration, consumed samples, fp16 loss scale) without the fp32 master weights and Adam
  moments, about a quarter of a full fp32 checkpoint. Resume from it with `--no-load-optim` (the
  optimizer starts fresh from the loaded weights), or start a new run from it with `--finetune`.

How: W local CPU processes (gloo, the environment torchrun would give them, one thread each) build
the run config of SRC's `megamm.json` with the parallel section replaced by the target layout, the
model chunks and trainer of that layout, and a `Checkpointer`; they load SRC (without generator
states, which only fit the layout that saved them: the target ranks' generators are seeded from the
run's --seed, as a resume at a new layout would) and save it at the same iteration and consumed
samples into DST, which gets `DST/iter_NNNNNNN` and `DST/latest`: `Checkpointer.save`, or with
`--no-optim` `Checkpointer.save_model` (the description then says `"optimizer": "none"`). The
description records the source (`resharded_from`). The whole model and optimizer state passes
through the W processes' memory, as in training at the target layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megamm.checkpoint import dcp_io, format
from megamm.config import ConfigError
from megamm.config.parsing import run_config_from_dict
from megamm.config.resolved import ResolvedConfig, resolve


class ReshardError(Exception):
    """A problem with the request or the checkpoints, reported without a traceback."""


@dataclasses.dataclass(frozen=True)
class Target:
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    world_size: int
    use_distributed_optimizer: bool | None
    num_layers_per_virtual_pipeline_stage: int | None
    decoder_first_pipeline_num_layers: int | None
    decoder_last_pipeline_num_layers: int | None
    sequence_parallel: bool | None
    no_optim: bool


def target_config(description: dict, target: Target) -> ResolvedConfig:
    """SRC's run config with the parallel section replaced by the target layout (and the optimizer
    kind as asked); everything else as SRC ran it. Raises ReshardError listing every problem."""
    tree = description.get("config")
    if not isinstance(tree, dict):
        raise ReshardError(f"the checkpoint's {format.DESCRIPTION} holds no run config")
    tree = {**tree, "parallel": dict(tree.get("parallel") or {}), "training": dict(tree.get("training") or {})}
    source_parallel = tree["parallel"]
    # Not given: as SRC ran (in effect only where the target has tp > 1, see ResolvedConfig).
    sequence_parallel = target.sequence_parallel
    if sequence_parallel is None:
        sequence_parallel = bool(source_parallel.get("sequence_parallel"))
    tree["parallel"] = {
        "tensor_model_parallel_size": target.tensor_model_parallel_size,
        "pipeline_model_parallel_size": target.pipeline_model_parallel_size,
        "sequence_parallel": sequence_parallel,
        "num_layers_per_virtual_pipeline_stage": target.num_layers_per_virtual_pipeline_stage,
        "decoder_first_pipeline_num_layers": target.decoder_first_pipeline_num_layers,
        "decoder_last_pipeline_num_layers": target.decoder_last_pipeline_num_layers,
    }
    if "distributed_timeout_minutes" in source_parallel:
        tree["parallel"]["distributed_timeout_minutes"] = source_parallel["distributed_timeout_minutes"]
    if target.use_distributed_optimizer is not None:
        tree["training"]["use_distributed_optimizer"] = target.use_distributed_optimizer
    try:
        config = run_config_from_dict(tree)
    except ConfigError as error:
        raise ReshardError(f"the checkpoint's run config does not build: {error}") from error
    try:
        return resolve(config, target.world_size)
    except ConfigError as error:
        raise ReshardError(
            f"the target layout does not fit this run (world size {target.world_size}):\n  - "
            + "\n  - ".join(error.problems)
        ) from error


def _layout_text(layout: dict | None) -> str:
    if not layout:
        return "unknown layout"
    sp = ", sequence parallel" if layout.get("sequence_parallel") else ""
    vp = f", {layout['virtual_stages']} virtual stages" if layout.get("virtual_stages", 1) > 1 else ""
    cp = f" x cp {layout['cp']}" if layout.get("cp", 1) > 1 else ""
    return f"world {layout['world_size']} = tp {layout['tp']}{cp} x pp {layout['pp']} x dp {layout['dp']}{vp}{sp}"


# ---- the workers ---------------------------------------------------------------------------------


def _worker(rank: int, world_size: int, port: int, source: str, save: str, description: dict, target: Target,
            results: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        summary = _reshard(rank, source, save, description, target)
        if rank == 0:
            results.put(("ok", rank, summary))
    except BaseException as error:  # noqa: BLE001 - every failure must reach the parent with its reason
        known = isinstance(error, (ReshardError, format.CheckpointMismatchError, format.CheckpointFormatError,
                                   ConfigError))
        results.put(("error", rank, str(error) if known else traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _reshard(rank: int, source: str, save: str, description: dict, target: Target) -> dict:
    from megamm.checkpoint.checkpointer import Checkpointer
    from megamm.parallel.state import initialize_parallel_state
    from megamm.pipeline.chunks import build_model_chunks
    from megamm.training.step import build_trainer

    config = target_config(description, target)
    p, t = config.parallel, config.training
    state = initialize_parallel_state(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                      p.distributed_timeout_minutes, use_cuda=False,
                                      context_parallel_size=p.context_parallel_size)
    state.seed(t.seed)
    chunks = build_model_chunks(config, state)
    trainer = build_trainer(config, state, chunks)
    log_lines: list[str] = []
    optimizer = None if target.no_optim else trainer.optimizer
    checkpointer = Checkpointer(state, config, chunks, optimizer, trainer.scaler, save_dir=save,
                                log=log_lines.append if rank == 0 else lambda _: None)

    started = time.perf_counter()
    progress = checkpointer.load(source, load_optim=not target.no_optim, load_rng=False)
    if progress is None:
        raise ReshardError(f"no checkpoint in {source}")
    loaded = time.perf_counter()
    write = checkpointer.save_model if target.no_optim else checkpointer.save
    write(progress.iteration, progress.consumed_samples, extra={"resharded_from": source})
    return {
        "iteration": progress.iteration,
        "consumed_samples": progress.consumed_samples,
        "load_seconds": loaded - started,
        "save_seconds": time.perf_counter() - loaded,
        "log": log_lines,
    }


# ---- the parent ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_request(source: Path, save: Path, description: dict, target: Target) -> None:
    """What can be checked before any process starts: the source holds what --no-optim's absence
    needs, and the save would not overwrite the source or an existing checkpoint."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        keys = dcp_io.saved_tensors(source)
    except (FileNotFoundError, format.CheckpointFormatError) as error:
        raise ReshardError(f"cannot read the checkpoint metadata of {source}: {error}") from error
    moments = format.optimizer_key("exp_avg", "")
    has_moments = any(k.startswith(moments) and isinstance(v, TensorStorageMetadata) for k, v in keys.items())
    if not target.no_optim and not has_moments:
        raise ReshardError(f"{source} holds no optimizer state (a model-only checkpoint): pass --no-optim")
    destination = format.iteration_dir(save, description["iteration"])
    if destination.resolve() == source.resolve():
        raise ReshardError(f"--save {save} would overwrite the source checkpoint {source}: choose another directory")
    if destination.exists():
        raise ReshardError(f"{destination} already exists: choose another --save directory or remove it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reshard_checkpoint.py",
        description="Rewrite a megamm checkpoint in another parallel layout's rank files (megamm.train --load "
                    "reads any layout directly; this writes the target layout's own shards, or a model-only "
                    "checkpoint with --no-optim).",
    )
    parser.add_argument("--load", required=True, metavar="SRC", help="the source: a checkpoint or a --save directory with 'latest'")
    parser.add_argument("--save", required=True, metavar="DST", help="the destination save directory (gets iter_NNNNNNN and latest)")
    parser.add_argument("--tensor-model-parallel-size", type=int, required=True, metavar="T",
                        help="tensor-parallel size of the target layout")
    parser.add_argument("--pipeline-model-parallel-size", type=int, required=True, metavar="P",
                        help="pipeline stages of the target layout")
    parser.add_argument("--world-size", type=int, metavar="W", help="processes of the target layout (default: tp x pp, dp 1)")
    parser.add_argument("--use-distributed-optimizer", action=argparse.BooleanOptionalAction, default=None,
                        help="the target run's optimizer (default: as the source ran)")
    parser.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None, metavar="N",
                        help="language layers per virtual stage at the target (default: no virtual stages)")
    parser.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                        help="language layers on the first pipeline stage (default: even split)")
    parser.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                        help="language layers on the last pipeline stage (default: even split)")
    parser.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                        help="record the target run as sequence parallel (default: as the source, when tp > 1)")
    parser.add_argument("--no-optim", action="store_true",
                        help="write the model weights and progress only (no master weights or Adam moments)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    world_size = args.world_size if args.world_size is not None else tp * pp
    target = Target(tp, pp, world_size, args.use_distributed_optimizer, args.num_layers_per_virtual_pipeline_stage,
                    args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers,
                    args.sequence_parallel, args.no_optim)
    try:
        if tp < 1 or pp < 1 or world_size < 1:
            raise ReshardError("--tensor-model-parallel-size, --pipeline-model-parallel-size and --world-size "
                               "must be >= 1")
        try:
            source = format.resolve(args.load)
        except (FileNotFoundError, ValueError) as error:
            raise ReshardError(str(error)) from error
        if source is None:
            raise ReshardError(f"no checkpoint in {args.load}: expected a checkpoint directory or a save "
                               f"directory with '{format.LATEST}'")
        description = format.read_description(source)
        target_config(description, target)  # fail here, before any process starts
        _check_request(source, Path(args.save), description, target)
    except (ReshardError, OSError, ValueError) as error:
        print(f"reshard_checkpoint: {error}", file=sys.stderr)
        return 2

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    started = time.perf_counter()
    failure = None
    try:
        mp.spawn(_worker, args=(world_size, _free_port(), str(source), args.save, description, target, results),
                 nprocs=world_size, join=True)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
        failure = error
    messages = []
    while not results.empty():
        messages.append(results.get())
    errors = [(rank, text) for status, rank, text in messages if status == "error"]
    if failure is not None or errors:
        for rank, text in errors:
            print(f"reshard_checkpoint: rank {rank} failed: {text}", file=sys.stderr)
        if not errors:
            print(f"reshard_checkpoint: a worker failed: {failure}", file=sys.stderr)
        return 1
    summary = next((payload for status, _, payload in messages if status == "ok"), None)
    if summary is None:
        print("reshard_checkpoint: the workers ended without a result", file=sys.stderr)
        return 1
    _print_summary(source, description, summary, Path(args.save), time.perf_counter() - started)
    return 0


def _print_summary(source: Path, description: dict, summary: dict, save: Path, seconds: float) -> None:
    final = format.iteration_dir(save, summary["iteration"])
    written = format.read_description(final)
    shards = sorted(final.glob("__*_*.distcp"))
    total = sum(path.stat().st_size for path in final.iterdir() if path.is_file())
    source_total = sum(path.stat().st_size for path in source.iterdir() if path.is_file())
    if written["optimizer"] == "none":
        state = "no optimizer state: model weights and progress only"
    else:
        state = f"{written['optimizer']} optimizer, with optimizer state"
    print(f"resharded {source}")
    print(f"  from  {_layout_text(description.get('layout'))}, {description.get('optimizer')} optimizer, "
          f"{source_total / 2**20:.2f} MiB on disk")
    print(f"  to    {_layout_text(written['layout'])}, {state}, "
          f"{total / 2**20:.2f} MiB on disk")
    print(f"  iteration {summary['iteration']}, consumed samples {summary['consumed_samples']}")
    print(f"  wrote {final} ({len(shards)} shard files: "
          + ", ".join(f"{p.name} {p.stat().st_size / 2**20:.2f} MiB" for p in shards) + f"); {save / format.LATEST} "
          f"names it")
    print(f"  load {summary['load_seconds']:.1f} s, save {summary['save_seconds']:.1f} s, {seconds:.1f} s in all")
    for line in summary["log"]:
        print(f"  checkpointer:{line}")


if __name__ == "__main__":
    sys.exit(main())
