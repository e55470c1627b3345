"""Save and load a run's state as one sharded, reshardable checkpoint.

A `Checkpointer` is given what it saves: the parallel state, the run config (recorded in the
description), this stage's model chunks, the optimizer (or None) and the fp16 loss scaler (or
None); the iteration and consumed samples are arguments of `save`, and `load` returns them. The
keys, the description, publication and the fit check are `megamm.checkpoint.format`'s.

- `save`: the model, the optimizer state (when there is an optimizer), progress and every rank's
  generator states: what an exact resume needs.
- `save_model`: the model and progress only (a quarter of a full fp32 checkpoint); a run resumes
  from it with `--no-load-optim`, generation and conversion read it like any other.

With LoRA (`config.lora`), "the model" is its trainable tensors only (adapters, and parts the
freeze flags leave trainable), and the description says so; the base comes from
`--pretrained-checkpoint` (megamm.checkpoint.adapters).

Every collective goes through the state's `checkpoint_group` (gloo, every rank), so an
asynchronous save can run DCP's collectives in a background thread while training continues on the
main groups. With a state of no groups (one process) everything is local.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter

from megamm.checkpoint import dcp_io, faults, format
from megamm.checkpoint.adapters import adapter_description, trainable_blocks
from megamm.checkpoint.blocks import (
    BlockLoadPlanner,
    BlockSavePlanner,
    BlockTensor,
    gathered_shapes,
    model_blocks,
    optimizer_blocks,
)
from megamm.config.parsing import run_config_to_dict
from megamm.config.resolved import ResolvedConfig
from megamm.optim.optimizer import DistributedOptimizer, MixedPrecisionOptimizer
from megamm.optim.schedules import DynamicLossScaler
from megamm.parallel.params import param_specs
from megamm.parallel.state import ParallelState

Optimizer = MixedPrecisionOptimizer | DistributedOptimizer


@dataclass
class Progress:
    """Where a loaded checkpoint left training."""

    iteration: int
    consumed_samples: int
    path: Path


def _scalar(value: float) -> BlockTensor:
    return BlockTensor.whole(format.scalar(value))


def _vector(tensor: torch.Tensor) -> BlockTensor:
    return BlockTensor.whole(tensor.reshape(-1))


def _read_scalar(loaded: Mapping[str, BlockTensor], key: str) -> float:
    return loaded[key].block((0,)).item()


@dataclass
class _PendingSave:
    thread: threading.Thread
    iteration: int
    description: dict
    errors: list[BaseException]


class Checkpointer:
    """One run's checkpoints.

    state: this process's parallel state (ranks, groups, device, generator tracker). config: the run
    config as resolved (its sections are recorded in every description). chunks: this pipeline stage's model chunks. optimizer:
    its master weights and Adam moments are saved and loaded (None: model and progress only).
    scaler: the fp16 loss scaler (None without fp16). save_dir: where `save` / `save_model` write
    (`iter_N/` and `latest`); keep_last: how many complete checkpoints to keep; async_save: write in
    a background thread from a CPU snapshot; log: where the rank's messages go.
    """

    def __init__(self, state: ParallelState, config: ResolvedConfig, chunks: Sequence[nn.Module],
                 optimizer: Optimizer | None = None, scaler: DynamicLossScaler | None = None, *,
                 save_dir: str | Path | None = None, keep_last: int | None = None, async_save: bool = False,
                 log: Callable[[str], None] = print) -> None:
        self.state = state
        self.config = config
        self.chunks = list(chunks)
        self.optimizer = optimizer
        self.scaler = scaler
        self.save_dir = Path(save_dir) if save_dir else None
        self.keep_last = keep_last
        self.async_save = async_save
        self.log = log
        self.group = state.checkpoint_group
        self.coordinator = state.rank == 0
        self.last_write_seconds: float | None = None
        self._pending: _PendingSave | None = None

    @property
    def layout(self) -> dict:
        """The layout signature of this run (megamm.checkpoint.format.layout_signature)."""
        s = self.state
        return format.layout_signature(s.tp_size, s.pp_size, s.dp_size, len(self.chunks),
                                       self.config.sequence_parallel, cp=s.cp_size)

    # ---- the state -------------------------------------------------------------------------------

    def model_state(self) -> dict[str, BlockTensor]:
        """`model/` blocks: every parameter, or with LoRA the trainable ones."""
        blocks = model_blocks(self.chunks, self.state)
        return blocks if self.config.lora is None else trainable_blocks(blocks, self.chunks)

    def optimizer_state(self, create: bool) -> dict[str, BlockTensor]:
        """Master weights and moments as blocks; `create` makes zero moments first (before a load)."""
        optimizer = self._need_optimizer()
        names = {id(p): name for chunk in self.chunks for name, p in chunk.named_parameters()}
        layouts = {name: spec.layout for chunk in self.chunks for name, spec in param_specs(chunk).items()}
        pieces_by_name: dict[str, list] = {}
        for piece in optimizer.pieces:
            pieces_by_name.setdefault(names[id(piece.param)], []).append(piece)
        out: dict[str, BlockTensor] = {}
        for name, pieces in pieces_by_name.items():
            tensors: dict[str, list[tuple[torch.Tensor, tuple[int, int] | None]]] = {}
            for piece in pieces:
                if create:
                    moments = optimizer.adam.state.setdefault(piece.master, {})
                else:
                    moments = optimizer.adam.state.get(piece.master, {})
                if create and "exp_avg" not in moments:
                    moments["step"] = torch.zeros((), dtype=torch.float32)
                    moments["exp_avg"] = torch.zeros_like(piece.master, memory_format=torch.contiguous_format)
                    moments["exp_avg_sq"] = torch.zeros_like(piece.master, memory_format=torch.contiguous_format)
                tensors.setdefault("master", []).append((piece.master, piece.span))
                for moment in ("exp_avg", "exp_avg_sq"):
                    if moment in moments:
                        tensors.setdefault(moment, []).append((moments[moment], piece.span))
            for kind, items in tensors.items():
                out[format.optimizer_key(kind, name)] = optimizer_blocks(pieces[0].param, layouts[name], items, self.state)
        steps = [float(s["step"]) for s in optimizer.adam.state.values() if "step" in s]
        out[format.OPTIMIZER_STEP] = _scalar(max(steps) if steps else 0.0)
        return out

    def progress_state(self, iteration: int, consumed_samples: int) -> dict[str, BlockTensor]:
        out = {format.ITERATION: _scalar(iteration), format.CONSUMED_SAMPLES: _scalar(consumed_samples)}
        if self.scaler is not None:
            out[format.LOSS_SCALE] = _scalar(self.scaler.scale)
            out[format.LOSS_SCALE_GOOD_STEPS] = _scalar(self.scaler.good_steps)
        return out

    def rng_state(self) -> dict[str, BlockTensor]:
        prefix = format.rng_prefix(self.state.rank)
        out = {f"{prefix}cpu": _vector(torch.get_rng_state())}
        if self.state.device.type == "cuda":
            out[f"{prefix}cuda"] = _vector(torch.cuda.get_rng_state(self.state.device))
        for name, value in self.state.rng.get_states().items():
            out[f"{prefix}{name}"] = _vector(value)
        return out

    def _need_optimizer(self) -> Optimizer:
        if self.optimizer is None:
            raise ValueError("this Checkpointer has no optimizer: save_model() and load(load_optim=False) "
                             "are what it can do")
        return self.optimizer

    def _optimizer_kind(self) -> str:
        if self.optimizer is None:
            return "none"
        return "distributed" if isinstance(self.optimizer, DistributedOptimizer) else "plain"

    # ---- save ------------------------------------------------------------------------------------

    def save(self, iteration: int, consumed_samples: int, extra: Mapping[str, object] | None = None) -> None:
        """Write a checkpoint of the whole state (in the background with async saves). `extra`:
        fields added to the description."""
        self._need_save_dir()
        tensors = self.model_state()
        if self.optimizer is not None:
            # create=True: before the first step Adam has no moments yet; saving zeros (what Adam
            # would start from) keeps the checkpoint complete for a later full resume.
            tensors.update(self.optimizer_state(create=True))
        tensors.update(self.progress_state(iteration, consumed_samples))
        tensors.update(self.rng_state())
        self._save(tensors, iteration, self._optimizer_kind(), extra)

    def save_model(self, iteration: int, consumed_samples: int,
                   extra: Mapping[str, object] | None = None) -> None:
        """Write a model-only checkpoint: the weights and progress, no optimizer or generator states."""
        self._need_save_dir()
        tensors = {**self.model_state(), **self.progress_state(iteration, consumed_samples)}
        self._save(tensors, iteration, "none", extra)

    def _save(self, tensors: dict[str, BlockTensor], iteration: int, optimizer: str,
              extra: Mapping[str, object] | None) -> None:
        self.wait()
        if self.config.lora is not None:
            extra = {**adapter_description(self.config.training.pretrained_checkpoint), **(extra or {})}
        description = format.describe(iteration, self.layout, optimizer, run_config_to_dict(self.config.run),
                                      **(extra or {}))
        if self.coordinator:
            format.open_partial(self.save_dir, iteration)
        self._barrier()
        directory = format.partial_dir(self.save_dir, iteration)
        if not self.async_save:
            self._write(tensors, directory, iteration)
            self._publish(iteration, description)
            return
        # Snapshot on the CPU now, so training can change the live tensors while the copy is written.
        snapshot = {key: value.cpu_copy() for key, value in tensors.items()}
        errors: list[BaseException] = []

        def write() -> None:
            try:
                self._write(snapshot, directory, iteration)
            except BaseException as error:  # noqa: BLE001 - re-raised on the main thread by wait()
                errors.append(error)

        thread = threading.Thread(target=write, name=f"megamm-save-{iteration}", daemon=True)
        thread.start()
        self._pending = _PendingSave(thread, iteration, description, errors)

    def _need_save_dir(self) -> None:
        if self.save_dir is None:
            raise ValueError("this Checkpointer has no save directory (--save)")

    def _write(self, tensors: dict[str, BlockTensor], directory: Path, iteration: int) -> None:
        started = time.perf_counter()
        dcp_io.save(tensors, FileSystemWriter(directory), BlockSavePlanner(), self.group)
        self.last_write_seconds = time.perf_counter() - started
        faults.crash_point("write", iteration)

    def wait(self) -> None:
        """Finish an asynchronous save (every rank calls it at the same point)."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        pending.thread.join()
        if pending.errors:
            failure = pending.errors[0]
            raise RuntimeError(f"asynchronous save of iteration {pending.iteration} failed") from failure
        self._publish(pending.iteration, pending.description)

    def _publish(self, iteration: int, description: dict) -> None:
        self._barrier()  # every rank has written its shard
        if self.coordinator:
            final = format.publish(self.save_dir, iteration, description, self.keep_last)
            self.log(f" saved checkpoint {final}")
        self._barrier()  # no rank goes on before the checkpoint is visible

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    # ---- load ------------------------------------------------------------------------------------

    def load(self, load_dir: str | Path, load_optim: bool = True, load_rng: bool = True,
             reset_progress: bool = False, verify: bool = True) -> Progress | None:
        """Load `load_dir` (a checkpoint, or a save directory with `latest`) into the live state.

        With `verify` (`--no-verify-checkpoint` turns it off), every file read is first checked
        against the checksums of the checkpoint's description, each rank checking the files it reads
        (megamm.checkpoint.dcp_io); a mismatch is a CheckpointFormatError naming the file.

        Returns None when the directory holds no checkpoint yet. Raises CheckpointMismatchError
        listing every missing, unexpected or differently shaped tensor before anything is read.
        """
        if load_optim:
            self._need_optimizer()
        self.wait()
        path = format.resolve(load_dir)
        if path is None:
            self.log(f" no checkpoint in {load_dir}: starting from the initialization")
            return None
        description = format.read_description(path)
        request = self.model_state()
        if load_optim:
            request.update(self.optimizer_state(create=True))
        if not reset_progress:
            request.update(self.progress_state(0, 0))
        if load_rng and not reset_progress:
            if format.same_layout(description.get("layout"), self.layout):
                request.update(self.rng_state())
            else:
                self.log(" checkpoint layout differs from this run: generator states start from --seed")
        source = dcp_io.reader(path, verify)
        fit = format.check_fit(path, self._everyone(request), source.read_metadata().state_dict_metadata,
                               optional=(format.RNG,), fresh_allowed=(format.FRESH_PROJECTOR,),
                               missing_hints={format.OPTIMIZER: "pass --no-load-optim to load the model only"})
        if format.FRESH_PROJECTOR in fit.fresh:
            self.log(f" {path} has no projector: the projector keeps its initialization from --seed")
        request = {key: value for key, value in request.items() if key in fit.keys}
        dcp_io.load(request, source, BlockLoadPlanner(), self.group)
        self._apply(request, load_optim)
        iteration = 0 if reset_progress else int(_read_scalar(request, format.ITERATION))
        consumed = 0 if reset_progress else int(_read_scalar(request, format.CONSUMED_SAMPLES))
        self.log(f" loaded checkpoint {path} (iteration {description['iteration']})")
        return Progress(iteration, consumed, path)

    def _everyone(self, request: dict[str, BlockTensor]) -> dict[str, tuple[int, ...]]:
        """{key: global shape} over every rank's request: the whole model, every pipeline stage."""
        return gathered_shapes(request, self.group)

    def _apply(self, loaded: dict[str, BlockTensor], load_optim: bool) -> None:
        if self.optimizer is not None:
            if load_optim and format.OPTIMIZER_STEP in loaded:
                step = _read_scalar(loaded, format.OPTIMIZER_STEP)
                for moments in self.optimizer.adam.state.values():
                    if "step" in moments:
                        moments["step"].fill_(step)
            if not load_optim:
                self.optimizer.reset_masters_from_params()
        if self.scaler is not None and format.LOSS_SCALE in loaded:
            self.scaler.scale = _read_scalar(loaded, format.LOSS_SCALE)
            self.scaler.good_steps = int(_read_scalar(loaded, format.LOSS_SCALE_GOOD_STEPS))
        prefix = format.rng_prefix(self.state.rank)
        rng = {k[len(prefix):]: v.block((0,)) for k, v in loaded.items() if k.startswith(prefix)}
        if rng:
            torch.set_rng_state(rng.pop("cpu").to(torch.uint8))
            if "cuda" in rng:
                torch.cuda.set_rng_state(rng.pop("cuda").to(torch.uint8), self.state.device)
            self.state.rng.set_states({name: value.to(torch.uint8) for name, value in rng.items()})
