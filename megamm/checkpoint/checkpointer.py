"""Save and load the whole training state as one sharded, reshardable checkpoint.

Keys (all global, whatever the parallel layout):

    model/<parameter name>              every parameter of every chunk, in its master shape
    optim/master/<name>, optim/exp_avg/<name>, optim/exp_avg_sq/<name>
                                        fp32 master weights and Adam moments (2-D view), for the
                                        trainable parameters, plain or distributed optimizer alike
    optim/step                          Adam's step count
    train/iteration, train/consumed_samples, train/loss_scale, train/loss_scale_good_steps
    rng/rank<r>/cpu, rng/rank<r>/cuda, rng/rank<r>/tensor-parallel
                                        each rank's generator states (restored only at the same layout)

Saves go through a gloo process group of their own, so an asynchronous save can run its DCP
collectives in a background thread while training continues on the main groups.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import megamm
from megamm.checkpoint import storage
from megamm.checkpoint.blocks import (
    BlockLoadPlanner,
    BlockSavePlanner,
    BlockTensor,
    master_blocks,
    parameter_blocks,
    view_2d_shape,
)
from megamm.config.parsing import run_config_to_dict
from megamm.optim.optimizer import DistributedOptimizer
from megamm.parallel.params import ParamSpec, param_specs

if TYPE_CHECKING:
    from megamm.training.step import Trainer


class CheckpointMismatchError(RuntimeError):
    """The checkpoint does not fit the model; the message lists every difference."""


@dataclass
class Progress:
    """Where a loaded checkpoint left training."""

    iteration: int
    consumed_samples: int
    path: Path


def _scalar(value: float, dtype: torch.dtype = torch.float64) -> BlockTensor:
    return BlockTensor((1,), {(0,): torch.tensor([value], dtype=dtype)})


def _is_projector(key: str) -> bool:
    return key.split("/")[-1].startswith("projector.")


def _vector(tensor: torch.Tensor) -> BlockTensor:
    return BlockTensor((tensor.numel(),), {(0,): tensor.reshape(-1)})


class Checkpointer:
    def __init__(self, trainer: Trainer, save_dir: str | None, keep_last: int | None = None,
                 async_save: bool = False, log: Callable[[str], None] = print) -> None:
        self.trainer = trainer
        self.save_dir = Path(save_dir) if save_dir else None
        self.keep_last = keep_last
        self.async_save = async_save
        self.log = log
        self.rank = dist.get_rank()
        # Collective: every rank creates it. DCP coordination and async saves use it.
        self.group = dist.new_group(backend="gloo")
        self._pending: tuple[threading.Thread, int, list[BaseException]] | None = None

    # ---- the state -------------------------------------------------------------------------------

    def _named_parameters(self):
        for chunk in self.trainer.chunks:
            yield from chunk.named_parameters()

    def _names(self) -> dict[int, str]:
        return {id(p): name for name, p in self._named_parameters()}

    def _specs(self) -> dict[str, ParamSpec]:
        return {name: spec for chunk in self.trainer.chunks for name, spec in param_specs(chunk).items()}

    def model_state(self) -> dict[str, BlockTensor]:
        state, specs = self.trainer.state, self._specs()
        return {
            f"model/{name}": parameter_blocks(p.data, specs[name].layout, state.tp_rank, state.tp_size)
            for name, p in self._named_parameters()
        }

    def optimizer_state(self, create: bool) -> dict[str, BlockTensor]:
        """Master weights and moments as blocks; `create` makes zero moments first (before a load)."""
        state, optimizer = self.trainer.state, self.trainer.optimizer
        names, specs = self._names(), self._specs()
        out: dict[str, BlockTensor] = {}
        pieces_by_key: dict[str, list] = {}
        for piece in optimizer.pieces:
            pieces_by_key.setdefault(names[id(piece.param)], []).append(piece)
        for name, pieces in pieces_by_key.items():
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
            param, layout = pieces[0].param, specs[name].layout
            for kind, items in tensors.items():
                blocks = {}
                for data, span in items:
                    blocks.update(master_blocks(data, layout, tuple(param.shape), state.tp_rank, state.tp_size, span))
                out[f"optim/{kind}/{name}"] = BlockTensor(view_2d_shape(layout.master_shape), blocks)
        out["optim/step"] = _scalar(self._adam_step())
        return out

    def _adam_step(self) -> float:
        steps = [float(s["step"]) for s in self.trainer.optimizer.adam.state.values() if "step" in s]
        return max(steps) if steps else 0.0

    def progress_state(self, iteration: int, consumed_samples: int) -> dict[str, BlockTensor]:
        out = {"train/iteration": _scalar(iteration), "train/consumed_samples": _scalar(consumed_samples)}
        scaler = self.trainer.scaler
        if scaler is not None:
            out["train/loss_scale"] = _scalar(scaler.scale)
            out["train/loss_scale_good_steps"] = _scalar(scaler.good_steps)
        return out

    def rng_state(self) -> dict[str, BlockTensor]:
        state = self.trainer.state
        prefix = f"rng/rank{self.rank}"
        out = {f"{prefix}/cpu": _vector(torch.get_rng_state())}
        if state.device.type == "cuda":
            out[f"{prefix}/cuda"] = _vector(torch.cuda.get_rng_state(state.device))
        for name, value in state.rng.get_states().items():
            out[f"{prefix}/{name}"] = _vector(value)
        return out

    def layout_signature(self) -> dict:
        s, t = self.trainer.state, self.trainer.config
        return {"world_size": s.world_size, "tp": s.tp_size, "pp": s.pp_size, "dp": s.dp_size,
                "virtual_stages": len(self.trainer.chunks), "sequence_parallel": t.sequence_parallel}

    # ---- save ------------------------------------------------------------------------------------

    def save(self, iteration: int, consumed_samples: int) -> None:
        """Write a checkpoint of the current state (in the background with async saves)."""
        if self.save_dir is None:
            raise ValueError("no --save directory")
        self.wait()
        # create=True: before the first step Adam has no moments yet; saving zeros (what Adam would
        # start from) keeps the checkpoint complete for a later full resume.
        state = {**self.model_state(), **self.optimizer_state(create=True),
                 **self.progress_state(iteration, consumed_samples), **self.rng_state()}
        directory = storage.partial_dir(self.save_dir, iteration)
        if self.rank == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            if directory.exists():
                import shutil

                shutil.rmtree(directory)
            directory.mkdir()
        dist.barrier(group=self.group)
        if not self.async_save:
            self._write(state, directory)
            self._publish(iteration)
            return
        # Snapshot on the CPU now, so training can change the live tensors while the copy is written.
        snapshot = {
            key: BlockTensor(tuple(v.shape), {o: b.detach().to("cpu", copy=True) for o, b in v.blocks.items()})
            for key, v in state.items()
        }
        errors: list[BaseException] = []

        def write() -> None:
            try:
                self._write(snapshot, directory)
            except BaseException as error:  # noqa: BLE001 - re-raised on the main thread by wait()
                errors.append(error)

        thread = threading.Thread(target=write, name=f"megamm-save-{iteration}", daemon=True)
        thread.start()
        self._pending = (thread, iteration, errors)

    def _write(self, state: dict, directory: Path) -> None:
        started = time.perf_counter()
        dcp.save(state, storage_writer=FileSystemWriter(directory), planner=BlockSavePlanner(),
                 process_group=self.group)
        self.last_write_seconds = time.perf_counter() - started

    def wait(self) -> None:
        """Finish an asynchronous save (every rank calls it at the same point)."""
        if self._pending is None:
            return
        thread, iteration, errors = self._pending
        self._pending = None
        thread.join()
        if errors:
            raise RuntimeError(f"asynchronous save of iteration {iteration} failed") from errors[0]
        self._publish(iteration)

    def _publish(self, iteration: int) -> None:
        dist.barrier(group=self.group)
        if self.rank == 0:
            directory = storage.partial_dir(self.save_dir, iteration)
            storage.write_description(directory, self.description(iteration))
            final = storage.publish(self.save_dir, iteration, self.keep_last)
            self.log(f" saved checkpoint {final}")
        dist.barrier(group=self.group)

    def description(self, iteration: int) -> dict:
        config = self.trainer.config
        return {
            "format": "megamm-dcp-1",
            "megamm_version": megamm.__version__,
            "torch_version": torch.__version__,
            "iteration": iteration,
            "layout": self.layout_signature(),
            "optimizer": "distributed" if isinstance(self.trainer.optimizer, DistributedOptimizer) else "plain",
            "config": run_config_to_dict(config.run),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    # ---- load ------------------------------------------------------------------------------------

    def load(self, load_dir: str, load_optim: bool = True, load_rng: bool = True,
             reset_progress: bool = False) -> Progress | None:
        """Load `load_dir` (a checkpoint, or a save directory with `latest`) into the live state.

        Returns None when the directory holds no checkpoint yet. Raises CheckpointMismatchError
        listing every missing, unexpected or differently shaped tensor.
        """
        path = storage.resolve(load_dir)
        if path is None:
            self.log(f" no checkpoint in {load_dir}: starting from the initialization")
            return None
        reader = storage.SafeFileSystemReader(path)
        saved = reader.read_metadata().state_dict_metadata
        description = storage.read_description(path)
        request = self.model_state()
        if load_optim:
            request.update(self.optimizer_state(create=True))
        if not reset_progress:
            request.update(self.progress_state(0, 0))
        same_layout = description.get("layout") == self.layout_signature()
        if load_rng and not reset_progress:
            if same_layout:
                request.update(self.rng_state())
            else:
                self.log(" checkpoint layout differs from this run: generator states start from --seed")
        request = self._check(request, saved, path, load_optim)
        dcp.load(request, storage_reader=reader, planner=BlockLoadPlanner(), process_group=self.group)
        self._apply(request, load_optim)
        iteration = 0 if reset_progress else int(request["train/iteration"].block((0,)).item())
        consumed = 0 if reset_progress else int(request["train/consumed_samples"].block((0,)).item())
        self.log(f" loaded checkpoint {path} (iteration {description.get('iteration')})")
        return Progress(iteration, consumed, path)

    def _check(self, request: dict, saved: dict, path: Path, load_optim: bool) -> dict:
        wanted = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(wanted, {k: tuple(v.shape) for k, v in request.items()}, group=self.group)
        everyone = {k: shape for part in wanted for k, shape in part.items()}
        problems = []
        missing = sorted(k for k in everyone if k not in saved and not k.startswith("rng/"))
        missing_model = [k for k in missing if k.startswith("model/")]
        if missing_model and all(_is_projector(k) for k in missing_model):
            # A stage-1 start from separately converted towers: the projector is new.
            self.log(f" {path} has no projector: the projector keeps its initialization from --seed")
            missing = [k for k in missing if not _is_projector(k)]
        if missing:
            optimizer_missing = load_optim and any(k.startswith("optim/") for k in missing)
            hint = " (pass --no-load-optim to load the model only)" if optimizer_missing else ""
            problems.append(f"missing in the checkpoint{hint}: " + ", ".join(missing))
        unexpected = sorted(k for k in saved if k.startswith("model/") and k not in everyone)
        if unexpected:
            problems.append("in the checkpoint but not in the model: " + ", ".join(unexpected))
        for key, shape in sorted(everyone.items()):
            info = saved.get(key)
            if isinstance(info, TensorStorageMetadata) and tuple(info.size) != shape:
                problems.append(f"{key}: checkpoint has shape {list(info.size)}, the model needs {list(shape)}")
        if problems:
            raise CheckpointMismatchError(f"checkpoint {path} does not fit this model:\n  - " + "\n  - ".join(problems))
        return {k: v for k, v in request.items() if k in saved}

    def _apply(self, loaded: dict, load_optim: bool) -> None:
        trainer = self.trainer
        optimizer = trainer.optimizer
        if load_optim and "optim/step" in loaded:
            step = loaded["optim/step"].block((0,)).item()
            for moments in optimizer.adam.state.values():
                if "step" in moments:
                    moments["step"].fill_(step)
        if not load_optim:
            optimizer.reset_masters_from_params()
        if trainer.scaler is not None and "train/loss_scale" in loaded:
            trainer.scaler.scale = loaded["train/loss_scale"].block((0,)).item()
            trainer.scaler.good_steps = int(loaded["train/loss_scale_good_steps"].block((0,)).item())
        prefix = f"rng/rank{self.rank}/"
        rng = {k[len(prefix):]: v.block((0,)) for k, v in loaded.items() if k.startswith(prefix)}
        if rng:
            torch.set_rng_state(rng.pop("cpu").to(torch.uint8))
            if "cuda" in rng:
                torch.cuda.set_rng_state(rng.pop("cuda").to(torch.uint8), trainer.state.device)
            trainer.state.rng.set_states({name: value.to(torch.uint8) for name, value in rng.items()})
