"""Run a function on N gloo processes, the way torchrun would, and collect what each returns.

Each worker gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its environment and
initializes through `megamm.parallel.initialize_parallel_state`, so the torchrun code path is what
the tests exercise. A worker that raises sends its traceback back and the test fails with it; a
worker that hangs is killed after `timeout` seconds.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        # Plain pickle bytes: torch's queue would share tensors through file descriptors that vanish
        # when this process exits before the parent reads them.
        results.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent, not hang it
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Run `fn(*args)` on `world_size` processes; return the per-rank results in rank order."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_worker, args=(rank, world_size, port, fn, args, results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    collected: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = results.get(timeout=timeout)
            if status == "ok":
                collected[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    except queue.Empty:
        errors.append(f"timed out after {timeout}s waiting for ranks {sorted(set(range(world_size)) - set(collected))}")
    finally:
        for process in processes:
            process.join(timeout=5 if not errors else 1)
            if process.is_alive():
                process.kill()
                process.join()
    if errors:
        raise RuntimeError("distributed worker failed:\n" + "\n".join(errors))
    return [collected[rank] for rank in range(world_size)]


def solo_state(device: torch.device | None = None):
    """A state whose every group is this rank alone: the single-process reference inside a
    multi-process test (collective: every rank must call it)."""
    from megamm.parallel.state import ParallelState

    rank = dist.get_rank()
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    mine = groups[rank]
    return ParallelState(
        tp_group=mine, dp_group=mine, pp_group=mine, mp_group=mine, pp_grad_group=mine, world_group=mine,
        checkpoint_group=mine, pp_ranks=[rank],
        device=device or torch.device("cpu"),
    )
