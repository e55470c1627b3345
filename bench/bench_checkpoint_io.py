"""Save and load throughput of megamm's checkpointer on CPU processes: GB/s per rank.

    python bench/bench_checkpoint_io.py [--repeats 3] [--dir /tmp] [--language-hidden 1024 ...]

What is measured: the real `megamm.checkpoint.checkpointer.Checkpointer` (DCP with megamm's block
planners, a gloo group of its own, atomic publication and `latest`) on 2 local gloo processes
(spawned the way torchrun would start them, one thread each), for a LLaVA-style model big enough that
the state, not the fixed costs, dominates: a ViT of hidden 512 x 6 layers, an mlp2x_gelu projector
and a LLaMA-style decoder of hidden 1024 x 8 layers with a 32000-token vocabulary, fp32 with the plain
AdamW optimizer, after one real training step so that the master weights and both Adam moments exist
and are saved too (about 4 x 4 bytes per parameter in all).

- save, sync: `save()` at tp=2 until it returns (every rank has written and fsynced its shard file
  and rank 0 has published the directory and `latest`).
- save, async: `save()` with `async_save=True` returns once the state is snapshotted on the CPU (the
  time until training could continue); `wait()` then returns once the background write is done and
  published (the time until published, counted from the start of `save()`).
- load, tp=2: `load()` of that checkpoint into a model at the same layout.
- load, tp=1 x dp=2: `load()` of the same checkpoint into a model at another layout (resharding):
  each rank now needs the whole model and optimizer state, read from both ranks' files.
- checksums: what publication spends hashing every file of the directory (rank 0, as in
  `format.publish`: megamm.checkpoint.integrity.checksum_directory on the checkpoint just written, so
  from the page cache), timed on its own after each sync save; a save without checksums takes the
  save's time minus this.
- load, no verify: the loads again with `verify=False` (`--no-verify-checkpoint`): each rank no
  longer hashes the files it reads. The last table puts both side by side.

Bytes per rank: for saves, the size of the rank's own `__<rank>_0.distcp` file; for loads, the
logical size of the blocks the rank asks for (model, optimizer and progress tensors at its layout).
GB/s = bytes / seconds with GB = 1e9 bytes, for each rank (and each rank's median over the repeats).
The checkpoint is written to a fresh temporary directory on local disk (`--dir`, default the system
temporary directory), removed at the end. Loads read files just written: with enough free memory they
come from the page cache, so load figures measure DCP's reading and copying, not the disk.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GB = 1e9


def build_config(args: argparse.Namespace, tp: int):
    from megamm.config.parsing import run_config_from_dict
    from megamm.config.resolved import resolve
    image, patch = args.image_size, 16
    tree = {
        "model": {
            "vision": {"image_size": image, "patch_size": patch, "select_layer": -2, "transformer": {
                "hidden_size": args.vision_hidden, "num_layers": args.vision_layers, "num_attention_heads": 8,
                "ffn_hidden_size": 4 * args.vision_hidden, "normalization": "layernorm", "activation": "quick_gelu",
                "add_bias_linear": True, "position_embedding": "learned", "causal": False}},
            "projector": {"type": "mlp2x_gelu"},
            "language": {"vocab_size": args.vocab, "image_token_id": args.vocab - 1, "transformer": {
                "hidden_size": args.language_hidden, "num_layers": args.language_layers,
                "num_attention_heads": args.language_hidden // 64, "num_query_groups": args.language_hidden // 128,
                "ffn_hidden_size": args.language_ffn}},
        },
        "parallel": {"tensor_model_parallel_size": tp},
        "training": {"mock_data": True, "micro_batch_size": 1, "global_batch_size": 2, "seq_length": args.seq_length,
                     "train_iters": 1, "lr": 1e-4, "weight_decay": 0.01},
    }
    return resolve(run_config_from_dict(tree), world_size=2)


def build(args: argparse.Namespace, tp: int):
    from megamm.parallel.state import initialize_parallel_state
    from megamm.pipeline.chunks import build_model_chunks
    from megamm.training.step import build_trainer

    config = build_config(args, tp)
    state = initialize_parallel_state(tp, 1, use_cuda=False)
    state.seed(config.training.seed)
    chunks = build_model_chunks(config, state)
    return config, state, build_trainer(config, state, chunks)


def requested_bytes(checkpointer) -> int:
    """The logical size of what this rank's `load()` asks for (before it runs: creates the moments)."""
    request = {**checkpointer.model_state(), **checkpointer.optimizer_state(create=True),
               **checkpointer.progress_state(0, 0)}
    return sum(block.numel() * block.element_size() for value in request.values() for block in value.blocks.values())


def timed(function, *args) -> float:
    dist.barrier()
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def _remove(rank: int, directory: Path) -> None:
    """Rank 0 deletes an old checkpoint outside the timed region (every rank calls this)."""
    dist.barrier()
    if rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
    dist.barrier()


def raw_write(path: Path, nbytes: int) -> tuple[int, float]:
    """The machine's own rate for this rank's bytes: one file, 64 MiB writes, fsync (as DCP does)."""
    data = memoryview(torch.ones(nbytes, dtype=torch.uint8).numpy())
    dist.barrier()
    started = time.perf_counter()
    with open(path, "wb") as stream:
        stream.writelines(data[offset : offset + (64 << 20)] for offset in range(0, nbytes, 64 << 20))
        stream.flush()
        os.fsync(stream.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return nbytes, seconds


def raw_read(path: Path) -> tuple[int, float]:
    """Read one file into memory already allocated (from the page cache when it was just written)."""
    data = memoryview(torch.empty(path.stat().st_size, dtype=torch.uint8).numpy())
    dist.barrier()
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as stream:
        offset = 0
        while offset < len(data):
            offset += stream.readinto(data[offset : offset + (64 << 20)])
    return len(data), time.perf_counter() - started


def _rank_file(directory: Path, rank: int) -> int:
    return sum(path.stat().st_size for path in directory.glob(f"__{rank}_*.distcp"))


def _unverified(checkpointer):
    """`checkpointer.load` without checksum verification (--no-verify-checkpoint)."""
    return lambda path: checkpointer.load(path, verify=False)


def worker(rank: int, port: int, args: argparse.Namespace, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        run(rank, args, Path(root))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(rank: int, args: argparse.Namespace, root: Path) -> None:
    from megamm.checkpoint import format, integrity
    from megamm.checkpoint.checkpointer import Checkpointer
    from megamm.data.loader import ResumePoint
    from megamm.training.data import SyntheticData
    from megamm.training.step import train_step

    def quiet(_: str) -> None:
        """The checkpointer's log lines would interleave with the table."""

    rows: list[tuple[str, str, float, float, float | None]] = []  # op, layout, bytes, seconds, extra seconds
    config, state, trainer = build(args, tp=2)
    step = train_step(trainer, SyntheticData(config, state, ResumePoint()).microbatches(0), 0)

    sync_dir, async_dir = root / "sync", root / "async"
    def checkpointer_for(trainer, save_dir: Path | None, async_save: bool = False) -> Checkpointer:
        return Checkpointer(trainer.state, trainer.config, trainer.chunks, trainer.optimizer, trainer.scaler,
                            save_dir=save_dir, async_save=async_save, log=quiet)

    checkpointer = checkpointer_for(trainer, sync_dir)
    parameters = sum(math.prod(value.shape) for value in checkpointer.model_state().values())
    for i in range(1, args.repeats + 1):
        _remove(rank, format.iteration_dir(sync_dir, i - 1))  # untimed: only the newest is kept
        seconds = timed(checkpointer.save, i, i)
        rows.append(("save, sync", "tp=2", _rank_file(format.iteration_dir(sync_dir, i), rank), seconds,
                     checkpointer.last_write_seconds))
        if rank == 0:
            directory = format.iteration_dir(sync_dir, i)
            started = time.perf_counter()
            files = integrity.checksum_directory(directory, skip=format.DESCRIPTION)
            rows.append(("checksums", "all files", sum(f["bytes"] for f in files.values()),
                         time.perf_counter() - started, None))
        dist.barrier()
    own_file = format.iteration_dir(sync_dir, args.repeats) / f"__{rank}_0.distcp"
    for _ in range(args.repeats):
        rows.append(("file write", "-", *raw_write(root / f"raw_{rank}.bin", own_file.stat().st_size), None))
        rows.append(("file read", "-", *raw_read(own_file), None))
    async_checkpointer = checkpointer_for(trainer, async_dir, async_save=True)
    for i in range(1, args.repeats + 1):
        _remove(rank, format.iteration_dir(async_dir, i - 1))
        dist.barrier()
        started = time.perf_counter()
        async_checkpointer.save(i, i)
        blocking = time.perf_counter() - started
        async_checkpointer.wait()
        published = time.perf_counter() - started
        rows.append(("save, async", "tp=2", _rank_file(format.iteration_dir(async_dir, i), rank), published,
                     blocking))
    checkpoint = format.iteration_dir(sync_dir, args.repeats)
    nbytes = requested_bytes(checkpointer)
    for _ in range(args.repeats):
        rows.append(("load", "tp=2", nbytes, timed(checkpointer.load, str(checkpoint)), None))
        rows.append(("load, no verify", "tp=2", nbytes, timed(_unverified(checkpointer), str(checkpoint)), None))
    size_on_disk = sum(p.stat().st_size for p in checkpoint.iterdir() if p.is_file())
    del checkpointer, async_checkpointer, trainer, state
    gc.collect()

    _, _, trainer = build(args, tp=1)
    checkpointer = checkpointer_for(trainer, None)
    nbytes = requested_bytes(checkpointer)
    for _ in range(args.repeats):
        rows.append(("load", "tp=1 x dp=2", nbytes, timed(checkpointer.load, str(checkpoint)), None))
        rows.append(("load, no verify", "tp=1 x dp=2", nbytes, timed(_unverified(checkpointer), str(checkpoint)),
                     None))

    everyone: list = [None, None]
    dist.all_gather_object(everyone, rows)
    if rank == 0:
        report(args, everyone, parameters, size_on_disk, step.loss, root)


def report(args: argparse.Namespace, everyone: list, parameters: int, size_on_disk: int, loss: float,
           root: Path) -> None:
    before = " ".join(f"{x:.2f}" for x in args.load_before)
    after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average (1, 5, 15 min): {before} before, {after} after")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"2 gloo processes x 1 thread, checkpoint in {root}")
    print(f"model: vision {args.vision_hidden} x {args.vision_layers} layers, language {args.language_hidden} x "
          f"{args.language_layers} layers (ffn {args.language_ffn}), vocab {args.vocab}; {parameters:,} "
          f"parameters (fp32, plain AdamW; step-0 loss {loss:.4f})")
    print(f"checkpoint on disk: {size_on_disk / GB:.3f} GB (model, fp32 master weights, both Adam moments); "
          f"median of {args.repeats} repeats per figure\n")
    header = (f"{'operation':<15} {'layout':<12} {'rank':>4} {'GB per rank':>12} {'seconds':>8} {'min-max s':>11} "
              f"{'GB/s':>7}  note")
    print(header)
    print("-" * len(header))
    keys = list(dict.fromkeys((op, layout) for op, layout, *_ in everyone[0]))
    for op, layout in keys:
        for rank, rows in enumerate(everyone):
            mine = [r for r in rows if (r[0], r[1]) == (op, layout)]
            if not mine:  # checksums: rank 0 only, as in publication
                continue
            nbytes = statistics.median(r[2] for r in mine)
            seconds = statistics.median(r[3] for r in mine)
            rates = [r[2] / r[3] / GB for r in mine]
            note = ""
            if op == "save, sync":
                note = f"DCP write {statistics.median(r[4] for r in mine):.2f} s of it"
            elif op == "save, async":
                note = (f"training blocked {statistics.median(r[4] for r in mine):.2f} s, "
                        f"then published after {seconds:.2f} s")
            if op.startswith("file"):
                note = "baseline: plain file I/O of the same bytes" + (", with fsync" if op == "file write" else "")
            spread = f"{min(r[3] for r in mine):.2f}-{max(r[3] for r in mine):.2f}"
            print(f"{op:<15} {layout:<12} {rank:>4} {nbytes / GB:>12.3f} {seconds:>8.2f} {spread:>11} "
                  f"{statistics.median(rates):>7.3f}  {note}")
    print("\nGB/s: each rank's bytes / its seconds (median over repeats); for async saves, over the time until "
          "published")
    print(side_by_side(everyone))


def side_by_side(everyone: list) -> str:
    """Rank 0's median seconds with and without checksums, and their ratio (with / without)."""
    def median(op: str, layout: str) -> float:
        return statistics.median(r[3] for r in everyone[0] if (r[0], r[1]) == (op, layout))

    hashing = median("checksums", "all files")
    pairs = [("save, sync, tp=2", median("save, sync", "tp=2"), median("save, sync", "tp=2") - hashing)]
    pairs += [(f"load, {layout}", median("load", layout), median("load, no verify", layout))
              for layout in ("tp=2", "tp=1 x dp=2")]
    lines = ["\nchecksums, rank 0 (median s): with / without = ratio"]
    lines += [f"  {name:<22} {with_:6.2f} / {without:6.2f} = {with_ / without:.2f}" for name, with_, without in pairs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="times each save and load is timed")
    parser.add_argument("--dir", default=None, help="parent of the temporary checkpoint directory (local disk)")
    parser.add_argument("--language-hidden", type=int, default=1024)
    parser.add_argument("--language-layers", type=int, default=8)
    parser.add_argument("--language-ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--vision-hidden", type=int, default=512)
    parser.add_argument("--vision-layers", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=64, help="16-pixel patches: 16 image tokens at 64")
    parser.add_argument("--seq-length", type=int, default=64, help="tokens per sample of the one training step")
    args = parser.parse_args(argv)
    build_config(args, tp=2)  # a bad shape fails here, before any process starts
    args.load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="megamm-ckpt-bench-", dir=args.dir))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        mp.spawn(worker, args=(port, args, str(root)), nprocs=2, join=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
