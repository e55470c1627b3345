"""What a run needs from the files it names, checked before anything starts.

The config layer checks the values (and that named paths exist); it imports no implementation, so
what the files hold is checked here, with the data and checkpoint layers' readers, and
`megamm.train.read_config` lists these problems with the config's in one message, before any
process group or model exists:

- `--data-path` / `--valid-data-path`: every path exists and holds a format megamm reads, probed at
  its first record (a .jpg given as a dataset would otherwise fail at the first batch as a run of
  bad records);
- `--tokenizer-model`: it opens (with the chat template's image token), its vocabulary and image
  token id fit the model, and it has the template's markers as single tokens;
- `--load`: it holds a checkpoint (Megatron starts from random weights when it does not; here a
  run given `--load` trains from what it names or not at all), and a resumed run has iterations
  left to train;
- `--pretrained-checkpoint` (LoRA's base): it holds a checkpoint of the whole model, not a LoRA
  run's trainable tensors (megamm.checkpoint.adapters).

Each check is skipped when a field it reads did not parse (megamm.config.unparsed).
"""

from __future__ import annotations

import os
from pathlib import Path

from megamm.checkpoint import format
from megamm.config.registry import CHAT_TEMPLATES
from megamm.config.run import RunConfig, TrainingConfig
from megamm.config.unparsed import gather
from megamm.data.datasets import parse_data_path, probe_source
from megamm.data.templates import get_template, template_tokenizer
from megamm.data.tokenizer import check_tokenizer


def file_problems(run: RunConfig) -> list[str]:
    """Every problem of the files `run` names (see the module docstring)."""
    t = run.training
    return gather(
        lambda: _data_problems("--data-path", t.data_path),
        lambda: _data_problems("--valid-data-path", t.valid_data_path),
        lambda: _tokenizer_problems(run),
        lambda: _checkpoint_problems(t),
        lambda: _pretrained_problems(t),
        lambda: _resume_contents_problems(t),
    )


def _data_problems(flag: str, items: list[str] | None) -> list[str]:
    if not items:
        return []
    try:
        pairs = parse_data_path(items, flag)
    except ValueError as error:
        return [str(error)]
    found = []
    for _, path in pairs:
        try:
            probe_source(path, flag)
        except (OSError, ValueError) as error:  # SourceError is a ValueError
            found.append(str(error))
    return found


def _tokenizer_problems(run: RunConfig) -> list[str]:
    """The tokenizer a --data-path run tokenizes with must open and fit the model (a missing path is
    the config's problem already)."""
    t = run.training
    if not t.data_path or not t.tokenizer_model or not Path(t.tokenizer_model).exists():
        return []
    if t.chat_template not in CHAT_TEMPLATES:
        return []  # the config's problem
    source = f"--tokenizer-model {t.tokenizer_model}"
    try:
        template = get_template(t.chat_template)
        tokenizer = template_tokenizer(t.tokenizer_model, template)
        check_tokenizer(tokenizer, run.model.language, source, template.required_tokens)
    except (OSError, ValueError) as error:
        return [str(error) if str(error).startswith(source) else f"{source}: {error}"]
    return []


def _checkpoint_iteration(path: Path) -> int | None:
    """The iteration checkpoint directory `path` was saved at (its description's), None when it names none."""
    iteration = format.read_description(path).get("iteration")
    return iteration if isinstance(iteration, int) else None


def _blend_problems(t: TrainingConfig, path: Path) -> list[str]:
    """A blended --data-path (several parts) is sized --train-iters x --global-batch-size, and its
    per-epoch order depends on that size, so a resume with another global batch size would read
    other samples: refused. (A single dataset or --mock-data continues from the consumed samples.)"""
    if not t.data_path or len(parse_data_path(t.data_path)) < 2:
        return []
    saved = (format.read_description(path).get("config") or {}).get("training", {}).get("global_batch_size")
    if saved is None or saved == t.global_batch_size:
        return []
    return [(f"--global-batch-size {t.global_batch_size}: checkpoint {path} trained with {saved}, and a blended "
             f"--data-path is sized --train-iters x --global-batch-size, so another batch size would change "
             f"its sample order; resume with --global-batch-size {saved} (a single dataset or --mock-data can "
             f"change it)")]


def _pretrained_problems(t: TrainingConfig) -> list[str]:
    """--pretrained-checkpoint names a whole model (a LoRA run's own checkpoint goes to --load)."""
    if not t.pretrained_checkpoint:
        return []
    try:
        path = format.resolve(t.pretrained_checkpoint)
        description = format.read_description(path) if path is not None else None
    except (OSError, ValueError) as error:
        return [f"--pretrained-checkpoint {t.pretrained_checkpoint}: {error}"]
    if description is None:
        return [(f"--pretrained-checkpoint {t.pretrained_checkpoint}: holds no megamm checkpoint "
                f"(neither {format.DESCRIPTION} nor {format.LATEST})")]
    if format.holds_trainable_only(description):
        return [(f"--pretrained-checkpoint {t.pretrained_checkpoint}: a LoRA run's checkpoint (trainable tensors "
                f"only); resume it with --load, on its base {description.get(format.PRETRAINED)}")]
    return []


def _resume_contents_problems(t: TrainingConfig) -> list[str]:
    """A LoRA run resumes from a LoRA run's checkpoint; a run without LoRA from a whole model."""
    try:
        path = format.resolve(t.load) if t.load else None
        description = format.read_description(path) if path is not None else None
    except (OSError, ValueError):
        return []  # reported by the --load check
    if description is None:
        return []
    lora, adapters_only = t.lora_rank is not None, format.holds_trainable_only(description)
    if lora and not adapters_only:
        return [(f"--load {t.load}: a whole model, not a LoRA run's checkpoint; start a LoRA run on it with "
                "--pretrained-checkpoint (--load resumes a LoRA run)")]
    if adapters_only and not lora:
        return [(f"--load {t.load}: a LoRA run's checkpoint (trainable tensors only): resume it with its --lora-* "
                "flags, or merge it into its base first (tools/merge_lora.py)")]
    return []


def _checkpoint_problems(t: TrainingConfig) -> list[str]:
    """An explicit --load must name a checkpoint, and resuming from it must leave steps to train."""
    if not t.load:
        return []
    try:
        path = format.resolve(t.load)
    except (OSError, ValueError):
        return []  # reported by the config's read of the checkpoint's model (megamm.train.saved_run_config)
    if path is None:
        what = "no such directory" if not os.path.exists(t.load) else (
            f"holds no megamm checkpoint (neither {format.DESCRIPTION} nor {format.LATEST})")
        return [(f"--load {t.load}: {what}; megamm does not start from the initialization when --load is "
                "given (Megatron does): leave --load out to train from scratch")]
    if t.finetune:
        return []
    try:
        iteration = _checkpoint_iteration(path)
    except (format.CheckpointFormatError, OSError) as error:
        return [f"--load {t.load}: {error}"]
    if iteration is None:
        return [f"--load {t.load}: {path / format.DESCRIPTION} names no iteration to resume from"]
    if iteration >= t.train_iters:
        return [(f"nothing to train: checkpoint {path} is at iteration {iteration}, --train-iters {t.train_iters} "
                "(--train-iters counts from the start of training; raise it, or pass --finetune to start at 0)")]
    try:
        return _blend_problems(t, path)
    except ValueError:
        return []  # a malformed --data-path is reported by the data check
