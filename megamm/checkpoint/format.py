"""The megamm checkpoint format: keys, the description file, publication, and the fit check.

Every writer (`Checkpointer`, the converter's one-process writer, tools/reshard_checkpoint.py) and
every reader (training resume, `load_model_weights`, the converter's reader, tools/checkpoint_info.py)
goes through this module, so the format is stated once.

On disk:

    <save>/iter_0000100/           DCP shards (__*_*.distcp), DCP metadata (.metadata), megamm.json
    <save>/latest                  the name of the newest complete checkpoint ("iter_0000100")
    <save>/iter_0000200.partial/   a save in progress (or one that crashed): never loaded

Keys (all global, whatever the parallel layout):

    model/<parameter name>              every parameter, in its master shape (megamm.checkpoint.blocks)
    optim/master/<name>, optim/exp_avg/<name>, optim/exp_avg_sq/<name>
                                        fp32 master weights and Adam moments (2-D view), for the
                                        trainable parameters, plain or distributed optimizer alike
    optim/step                          Adam's step count
    train/iteration, train/consumed_samples, train/loss_scale, train/loss_scale_good_steps
    rng/rank<r>/cpu, rng/rank<r>/cuda, rng/rank<r>/<tracker state>
                                        each rank's generator states (restored only at the same layout)
    hf_extra/<name>                     tensors an import kept aside for the export (not model weights)

Scalars are float64 tensors of shape [1].

Publication: a save writes into `iter_N.partial/`, its description (`megamm.json`) last, with the
size and checksum of every other file of the directory (megamm.checkpoint.integrity); only then
is the directory renamed to `iter_N/`, and only after that is `latest` replaced (through a
temporary file and an atomic rename). A crash at any point leaves the previous checkpoint complete
and `latest` naming it; the loaders trust only a directory with a description, reached by name or
through `latest`, and refuse a `.partial` one. A load verifies the files it reads against the
description's checksums and refuses a directory whose description has none (megamm.checkpoint.dcp_io).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

import megamm
from megamm.checkpoint import faults, integrity

# ---- keys ----------------------------------------------------------------------------------------

MODEL = "model/"
OPTIMIZER = "optim/"
OPTIMIZER_TENSORS = ("master", "exp_avg", "exp_avg_sq")
OPTIMIZER_STEP = OPTIMIZER + "step"
TRAIN = "train/"
ITERATION = TRAIN + "iteration"
CONSUMED_SAMPLES = TRAIN + "consumed_samples"
LOSS_SCALE = TRAIN + "loss_scale"
LOSS_SCALE_GOOD_STEPS = TRAIN + "loss_scale_good_steps"
RNG = "rng/"
HF_EXTRA = "hf_extra/"


def model_key(name: str) -> str:
    return MODEL + name


def optimizer_key(kind: str, name: str) -> str:
    """`optim/<kind>/<parameter name>`; kind is one of OPTIMIZER_TENSORS."""
    if kind not in OPTIMIZER_TENSORS:
        raise ValueError(f"optimizer tensor kind {kind!r}: expected one of {', '.join(OPTIMIZER_TENSORS)}")
    return f"{OPTIMIZER}{kind}/{name}"


def rng_prefix(rank: int) -> str:
    """The keys of rank `rank`'s generator states start with this."""
    return f"{RNG}rank{rank}/"


def parameter_name(key: str) -> str | None:
    """The parameter a model or optimizer-tensor key belongs to (None for any other key)."""
    if key.startswith(MODEL):
        return key[len(MODEL):]
    parts = key.split("/", 2)
    if len(parts) == 3 and parts[0] + "/" == OPTIMIZER and parts[1] in OPTIMIZER_TENSORS:
        return parts[2]
    return None


def scalar(value: float) -> torch.Tensor:
    """How a scalar is stored: float64 `[1]` (exact for every iteration and sample count)."""
    return torch.tensor([value], dtype=torch.float64)


# ---- the description file ------------------------------------------------------------------------

DESCRIPTION = "megamm.json"
FORMAT = "megamm-dcp-1"
OPTIMIZER_KINDS = ("plain", "distributed", "none")


class CheckpointFormatError(ValueError):
    """A checkpoint file is not what the format says; the message names the file."""


def layout_signature(tp: int, pp: int, dp: int, virtual_stages: int, sequence_parallel: bool, cp: int = 1) -> dict:
    """The layout a checkpoint was saved at, as its description records it. Generator states are
    restored only when a run's signature equals the checkpoint's. Nothing is sharded by cp but the
    distributed optimizer's flat pieces, which are saved as global tensors like dp's, so a
    checkpoint loads at any cp; `cp` is recorded for the reader."""
    return {"world_size": tp * cp * pp * dp, "tp": tp, "cp": cp, "pp": pp, "dp": dp,
            "virtual_stages": virtual_stages, "sequence_parallel": sequence_parallel}


def same_layout(saved: dict | None, current: dict) -> bool:
    """Whether a checkpoint's recorded layout is `current` (a layout_signature); a description
    written before cp was recorded was saved at cp = 1."""
    return isinstance(saved, dict) and {"cp": 1, **saved} == current


def describe(iteration: int, layout: dict, optimizer: str, config: dict, **extra: object) -> dict:
    """The description of a checkpoint: format, versions, iteration, layout, which optimizer state it
    holds ("plain", "distributed" or "none"), the run config tree, the time, and `extra` fields
    (where it came from: `converted_from`, `resharded_from`, `hf`)."""
    if optimizer not in OPTIMIZER_KINDS:
        raise ValueError(f"optimizer {optimizer!r}: expected one of {', '.join(OPTIMIZER_KINDS)}")
    return {
        "format": FORMAT,
        "megamm_version": megamm.__version__,
        "torch_version": torch.__version__,
        "iteration": iteration,
        "layout": layout,
        "optimizer": optimizer,
        "config": config,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def write_description(directory: Path, description: dict) -> None:
    path = Path(directory) / DESCRIPTION
    with open(path, "w") as stream:
        stream.write(json.dumps(description, indent=2, sort_keys=True, default=str) + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def read_description(directory: str | Path) -> dict:
    """The description of checkpoint `directory`. FileNotFoundError when it has none;
    CheckpointFormatError naming the file when it is not a megamm description."""
    path = Path(directory) / DESCRIPTION
    try:
        text = path.read_text()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{directory} is not a megamm checkpoint: no {DESCRIPTION}") from error
    try:
        description = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointFormatError(f"{path} is corrupt: not valid JSON ({error})") from error
    if not isinstance(description, dict):
        found = type(description).__name__
        raise CheckpointFormatError(f"{path} is corrupt: expected a JSON object, found {found}")
    if description.get("format") != FORMAT:
        raise CheckpointFormatError(f"{path}: format {description.get('format')!r}, expected {FORMAT!r}")
    iteration = description.get("iteration")
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        raise CheckpointFormatError(f"{path}: iteration {iteration!r} is not a non-negative integer")
    for field, kind in (("layout", dict), ("config", dict)):
        if field in description and not isinstance(description[field], kind):
            found = type(description[field]).__name__
            raise CheckpointFormatError(f"{path}: {field} is {found}, expected an object")
    return description


# What a checkpoint's `model/` keys cover: absent, the whole model; "trainable", a LoRA run's
# trainable tensors only, on the base its "pretrained" field names (megamm.checkpoint.adapters).
CONTENTS = "contents"
TRAINABLE = "trainable"
PRETRAINED = "pretrained"


def holds_trainable_only(description: Mapping[str, object]) -> bool:
    """Whether the checkpoint described is a LoRA run's (trainable tensors, not the whole model)."""
    return description.get(CONTENTS) == TRAINABLE


FILES = "files"


def described_files(directory: str | Path, description: dict) -> dict[str, dict]:
    """{file name: {"bytes": N, "xxh3_64": hex}} of every file `description` (of checkpoint
    `directory`) lists. CheckpointFormatError naming the file when it lists none (a directory that
    `publish` did not finish: a half-written save renamed by hand, or one from before checksums)
    or an entry is malformed."""
    path = Path(directory) / DESCRIPTION
    files = description.get(FILES)
    if not isinstance(files, dict) or not files:
        raise CheckpointFormatError(
            f"{path} lists no file checksums: {directory} was not published by megamm's save "
            f"(a half-written save renamed by hand?); loading without verification skips this check")
    for name, entry in files.items():
        valid = (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                 and isinstance(entry.get(integrity.HASH), str))
        if not valid:
            raise CheckpointFormatError(f"{path}: the entry of {name!r} in {FILES!r} is not "
                                        f"{{\"bytes\": N, \"{integrity.HASH}\": \"...\"}}: {entry!r}")
    return files


def verify_files(directory: str | Path, files: Mapping[str, dict], names: Sequence[str] | None = None) -> list[str]:
    """What is wrong with the files `names` of checkpoint `directory` (default: every file `files`
    lists) against their checksums: one line per missing, resized or corrupt file, [] when none."""
    directory = Path(directory)
    problems = []
    for name in files if names is None else names:
        if name not in files:
            problems.append(f"{directory / name} has no checksum in {directory / DESCRIPTION}")
            continue
        found = integrity.problem(directory / name, files[name])
        if found:
            problems.append(found)
    return problems


# ---- directories and publication -----------------------------------------------------------------

LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
ITERATION_DIR = re.compile(r"^iter_(\d{7,})$")


def iteration_dir(save: str | Path, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def partial_dir(save: str | Path, iteration: int) -> Path:
    return Path(str(iteration_dir(save, iteration)) + PARTIAL_SUFFIX)


def open_partial(save: str | Path, iteration: int) -> Path:
    """The coordinator, before anyone writes: an empty `iter_N.partial` under `save` (created if
    needed; a stale one left by a crashed save is removed)."""
    directory = partial_dir(save, iteration)
    Path(save).mkdir(parents=True, exist_ok=True)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir()
    return directory


def publish(save: str | Path, iteration: int, description: dict, keep_last: int | None = None) -> Path:
    """The coordinator, after every writer finished: hash every file of the partial directory,
    write the description (with the checksums under "files") into it, rename it to `iter_N`, then
    point `latest` at it; with `keep_last`, remove all but the newest `keep_last` complete
    checkpoints and any stale partial ones. Returns `iter_N`.

    The files are hashed here, once, for every writer (the Checkpointer, the converter, the reshard
    tool), right after they were written and fsynced, so they are re-read from the page cache. The
    crash points `rename` and `latest` of megamm.checkpoint.faults are here."""
    save = Path(save)
    partial = partial_dir(save, iteration)
    if not partial.is_dir():
        raise FileNotFoundError(f"{partial} does not exist: open_partial() starts a save")
    files = integrity.checksum_directory(partial, skip=DESCRIPTION)
    write_description(partial, {**description, FILES: files})
    faults.crash_point("rename", iteration)
    final = iteration_dir(save, iteration)
    if final.exists():  # the same iteration saved again: the new save replaces it
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(save)
    faults.crash_point("latest", iteration)
    tmp = save / f".{LATEST}.tmp"
    tmp.write_text(final.name + "\n")
    os.replace(tmp, save / LATEST)
    _fsync_dir(save)
    if keep_last is not None:
        _remove_old(save, keep_last, keep=final.name)
    return final


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_old(save: Path, keep_last: int, keep: str) -> None:
    complete = sorted(p for p in save.iterdir() if ITERATION_DIR.match(p.name))
    for old in complete[: max(0, len(complete) - keep_last)]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in save.glob(f"iter_*{PARTIAL_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)


def resolve(load: str | Path) -> Path | None:
    """The checkpoint directory `--load` names: `<dir>/latest`'s target, or `<dir>` itself when it
    is a checkpoint. None when `<dir>` holds no checkpoint yet (a first run that also saves there)."""
    load = Path(load)
    if load.name.endswith(PARTIAL_SUFFIX):
        raise ValueError(f"{load} is an unfinished save and cannot be loaded")
    if (load / DESCRIPTION).exists():
        return load
    latest = load / LATEST
    if latest.exists():
        target = load / latest.read_text().strip()
        if not (target / DESCRIPTION).exists():
            raise FileNotFoundError(f"{latest} names {target.name}, which is not a complete checkpoint")
        return target
    return None


# ---- does a checkpoint fit the model? ------------------------------------------------------------


# A checkpoint without any projector tensor (towers converted separately, before stage 1) loads:
# the projector keeps its initialization.
FRESH_PROJECTOR = "projector."


class CheckpointMismatchError(RuntimeError):
    """The checkpoint does not fit the model; the message lists every difference."""


@dataclass(frozen=True)
class Fit:
    """What a load that fits may read."""

    keys: frozenset[str]  # the wanted keys the checkpoint holds
    fresh: tuple[str, ...]  # the allowed parameter-name prefixes the checkpoint lacks as a whole


def check_fit(
    path: Path,
    wanted: Mapping[str, Sequence[int]],
    saved: Mapping[str, object],
    optional: Sequence[str] = (),
    fresh_allowed: Sequence[str] = (),
    missing_hints: Mapping[str, str] | None = None,
) -> Fit:
    """Compare the tensors a load wants with what checkpoint `path` holds; raise
    CheckpointMismatchError listing every difference at once, or return what to read.

    wanted: {key: global shape} of the whole model (every pipeline stage's keys). saved: DCP's
    `state_dict_metadata` of the checkpoint. Differences: a wanted key the checkpoint lacks, a
    `model/` key of the checkpoint the model lacks, a shape that differs. `optional`: key prefixes
    that may be absent (generator states). `fresh_allowed`: parameter-name prefixes whose parameters
    may be absent as a whole, model and optimizer keys alike (a projector a stage-1 run
    initializes); a part of them present is not allowed. `missing_hints`: {key prefix: text} added
    to the missing line when a missing key has the prefix.
    """
    model_names = [key[len(MODEL):] for key in saved if key.startswith(MODEL)]
    fresh = tuple(
        prefix for prefix in fresh_allowed
        if not any(name.startswith(prefix) for name in model_names)
        and any((parameter_name(key) or "").startswith(prefix) for key in wanted)
    )

    def may_be_absent(key: str) -> bool:
        name = parameter_name(key)
        return key.startswith(tuple(optional)) or (name is not None and name.startswith(fresh))

    problems = []
    missing = sorted(key for key in wanted if key not in saved and not may_be_absent(key))
    if missing:
        hints = [text for prefix, text in (missing_hints or {}).items()
                 if any(key.startswith(prefix) for key in missing)]
        hint = f" ({'; '.join(hints)})" if hints else ""
        problems.append(f"missing in the checkpoint{hint}: " + ", ".join(missing))
    unexpected = sorted(key for key in saved if key.startswith(MODEL) and key not in wanted)
    if unexpected:
        problems.append("in the checkpoint but not in the model: " + ", ".join(unexpected))
    for key, shape in sorted(wanted.items()):
        info = saved.get(key)
        if isinstance(info, TensorStorageMetadata) and tuple(info.size) != tuple(shape):
            problems.append(f"{key}: checkpoint has shape {list(info.size)}, the model needs {list(shape)}")
    if problems:
        listed = "\n  - ".join(problems)
        raise CheckpointMismatchError(f"checkpoint {path} does not fit this model:\n  - {listed}")
    return Fit(frozenset(key for key in wanted if key in saved), fresh)
