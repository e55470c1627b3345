"""YAML files and command-line flags -> one RunConfig.

Precedence: dataclass defaults < YAML file (`--config`) < flags. The YAML file has three sections:
`model` (the LlavaConfig tree: vision, language, projector and their `transformer` blocks),
`parallel` and `training` (field names as in megamm.config.run). Flags use the names Megatron users
type (`--micro-batch-size`, `--tensor-model-parallel-size`, `--freeze-LM`, ...); any field can be
set with `--set model.language.transformer.num_layers=4` (repeatable).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megamm.config.model import ConfigError, ParallelConfig
from megamm.config.run import RunConfig, TrainingConfig

# ---- YAML -> dataclasses -------------------------------------------------------------------------


def run_config_to_dict(config: RunConfig) -> dict:
    """The config as a YAML/JSON-ready tree that `run_config_from_dict` reads back (derived fields,
    such as the parameter dtype that --bf16 sets, are left out)."""
    tree = dataclasses.asdict(config)
    for tower in ("vision", "language"):
        tree["model"][tower]["transformer"].pop("params_dtype", None)
    return tree


def run_config_from_dict(tree: dict, world_size: int | None = None) -> RunConfig:
    """Build (and, given the world size, validate) a RunConfig from a tree like the YAML file's."""
    problems: list[str] = []
    config = _build(RunConfig, tree, "config", problems)
    if config is not None and not problems and world_size is not None:
        problems.extend(config.problems(world_size))
    if problems:
        raise ConfigError(problems)
    return config


def _build(cls: type, data: dict, where: str, problems: list[str]) -> Any:
    """Instantiate dataclass `cls` from a mapping, recursing into nested dataclasses; unknown keys
    and missing required fields are appended to `problems` (and a best-effort object returned)."""
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping, got {type(data).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            problems.append(f"{where}.{key}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, spec in names.items():
        hint = hints[name]
        if name not in data:
            required = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
            if required and dataclasses.is_dataclass(hint):
                kwargs[name] = _build(hint, {}, f"{where}.{name}", problems)
            elif required:
                problems.append(f"{where}.{name}: required")
            continue
        value = data[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}.{name}", problems)
        else:
            kwargs[name] = _coerce(hint, value, f"{where}.{name}", problems)
    if any(v is None and dataclasses.is_dataclass(hints[k]) for k, v in kwargs.items()):
        return None
    try:
        return cls(**kwargs)
    except TypeError as error:
        problems.append(f"{where}: {error}")
        return None


def _coerce(hint: Any, value: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against a field's type; YAML reads `3e-3` as a string, so numeric strings
    are accepted for float fields. A wrong value is reported (and returned unchanged)."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (
        typing.Union, types.UnionType) else [hint]
    if value is None and len(options) < len(typing.get_args(hint) or [hint]):
        return None
    for option in options:
        if typing.get_origin(option) is Literal:
            if value in typing.get_args(option):
                return value
        elif option is bool:
            if isinstance(value, bool):
                return value
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif option is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif option is str:
            if isinstance(value, str):
                return value
        elif typing.get_origin(option) is list:
            if isinstance(value, str):
                return value.split()
            if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
                return [str(v) for v in value]
        else:
            return value
    expected = " or ".join(
        "one of " + ", ".join(map(repr, typing.get_args(o))) if typing.get_origin(o) is Literal
        else getattr(o, "__name__", str(o)) for o in options
    )
    problems.append(f"{where}: expected {expected}, got {value!r}")
    return value




def _set_path(tree: dict, dotted: str, raw: str, problems: list[str]) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            problems.append(f"--set {dotted}: {part} is not a section")
            return
    node[parts[-1]] = yaml.safe_load(raw)


# ---- flags ---------------------------------------------------------------------------------------


def _without_none(hint: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def _flag_name(spec: dataclasses.Field) -> str:
    return spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megamm.train",
        description="Train a LlavaModel with tensor, sequence and data parallelism (launch with torchrun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML file with model, parallel and training sections")
    parser.add_argument(
        "--set", action="append", default=[], metavar="PATH=VALUE",
        help="override any config field, e.g. model.language.transformer.num_layers=4",
    )
    groups = {
        ParallelConfig: parser.add_argument_group("parallelism"),
        TrainingConfig: parser.add_argument_group("training"),
    }
    parallel_help = {
        "tensor_model_parallel_size": "tensor-parallel ranks per model replica",
        "pipeline_model_parallel_size": "pipeline stages per model replica",
        "sequence_parallel": "split norms/dropout along the sequence across tp ranks",
        "distributed_timeout_minutes": "collective timeout before a stuck job fails",
        "num_layers_per_virtual_pipeline_stage": "language layers per virtual stage (interleaved 1F1B)",
        "decoder_first_pipeline_num_layers": "language layers on the first pipeline stage (uneven split)",
        "decoder_last_pipeline_num_layers": "language layers on the last pipeline stage (uneven split)",
    }
    for cls, group in groups.items():
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            help_text = spec.metadata.get("help") or parallel_help.get(spec.name, "")
            kwargs: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS, "help": help_text}
            hint = hints[spec.name]
            if hint is bool or hint == bool | None:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(base_hint := _without_none(hint)) is Literal:
                kwargs["choices"] = typing.get_args(base_hint)
            elif list[str] in typing.get_args(hint):
                kwargs["nargs"] = "+"
            else:
                base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
                kwargs["type"] = base[0]
            kwargs["help"] = f"{help_text} (default: {spec.default})"
            group.add_argument(_flag_name(spec), **kwargs)
    return parser


def parse_run_config(argv: list[str] | None, world_size: int) -> RunConfig:
    """Parse flags (and the YAML they name) into a validated RunConfig, or raise ConfigError."""
    args = vars(build_parser().parse_args(argv))
    problems: list[str] = []
    tree: dict = {}
    config_path = args.pop("config", None)
    if config_path is not None:
        try:
            tree = yaml.safe_load(Path(config_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError([f"--config {config_path}: {error}"]) from error
    for item in args.pop("set", []):
        if "=" not in item:
            problems.append(f"--set {item}: expected PATH=VALUE")
            continue
        path, raw = item.split("=", 1)
        _set_path(tree, path, raw, problems)
    parallel_fields = {f.name for f in dataclasses.fields(ParallelConfig)}
    for name, value in args.items():
        section = "parallel" if name in parallel_fields else "training"
        tree.setdefault(section, {})[name] = value
    if "model" not in tree:
        problems.append("model: missing; give a --config file with a model section")
    config = _build(RunConfig, tree, "config", problems) if not problems else None
    # Semantic checks only make sense once every value has the right type.
    if config is not None and not problems:
        problems.extend(config.problems(world_size))
    if problems:
        raise ConfigError(problems)
    return config


