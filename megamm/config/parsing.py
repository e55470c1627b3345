"""YAML files and command-line flags -> one RunConfig.

Precedence: dataclass defaults < YAML files (`--config`, repeatable: later files win field by field)
< flags. The YAML has three sections: `model` (the LlavaConfig tree: vision, language, projector and
their `transformer` blocks), `parallel` and `training` (field names as in megamm.config.run). Flags
use the names Megatron users type (`--micro-batch-size`, `--tensor-model-parallel-size`,
`--freeze-LM`, ...); any field can be set with `--set model.language.transformer.num_layers=4`.

A run that loads a checkpoint (--load) builds the checkpoint's model: without a model section in the
YAML it takes the one the checkpoint saved, and a model section (YAML or --set) that differs from it
is a problem listing each differing field. The config layer does not read checkpoints: the caller
passes `saved_config` (megamm.train passes the checkpoint layer's reader).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml

from megamm.config.model import ConfigError, LlavaConfig, ParallelConfig
from megamm.config.run import RunConfig, TrainingConfig
from megamm.config.unparsed import UNPARSED, UnparsedFieldError, gather

# The run config tree a checkpoint saved (None when `--load` holds no checkpoint yet).
SavedConfig = Callable[[str], dict | None]

# ---- YAML -> dataclasses -------------------------------------------------------------------------


def _set_by(cls: type) -> dict[str, str]:
    """Fields of dataclass `cls` that a flag sets at build time (their `set_by` metadata): never in a YAML file."""
    return {f.name: f.metadata["set_by"] for f in dataclasses.fields(cls) if "set_by" in f.metadata}


def _without_set_by(value: Any) -> Any:
    """`dataclasses.asdict` of `value` without the build-time fields, recursively."""
    if not dataclasses.is_dataclass(value):
        return value
    skip = _set_by(type(value))
    return {f.name: _without_set_by(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name not in skip}


def run_config_to_dict(config: RunConfig) -> dict:
    """The config as a YAML/JSON-ready tree that `run_config_from_dict` reads back (the build-time
    fields, such as the parameter dtype that --bf16 sets, are left out)."""
    return _without_set_by(config)


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
    set_by = _set_by(cls)
    names = {f.name: f for f in dataclasses.fields(cls) if f.name not in set_by}
    for key in data:
        if key in set_by:
            problems.append(f"{where}.{key}: not a model setting; set it with the training flag {set_by[key]}")
        elif key not in names:
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
        elif value is not None and dataclasses.is_dataclass(_without_none(hint)):
            # An optional section (vision.native_resolution): absent or null is None.
            kwargs[name] = _build(_without_none(hint), value, f"{where}.{name}", problems)
        else:
            kwargs[name] = _coerce(hint, value, f"{where}.{name}", problems)
    if any(v is None and dataclasses.is_dataclass(hints[k]) for k, v in kwargs.items()):
        return None
    try:
        return cls(**kwargs)
    except TypeError as error:
        problems.append(f"{where}: {error}")
        return None
    except UnparsedFieldError:  # __post_init__ derives a value from a field reported as wrong
        return None


def _coerce(hint: Any, value: Any, where: str, problems: list[str]) -> Any:
    """Check `value` against a field's type; YAML reads `3e-3` as a string, so numeric strings
    are accepted for float fields. A wrong value is reported and becomes UNPARSED (the checks that
    use it are skipped, the others run); an UNPARSED flag value, already reported, stays so."""
    if value is UNPARSED:
        return value
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
        elif typing.get_origin(option) is tuple and typing.get_args(option)[1:] == (Ellipsis,):
            # JSON and YAML hold tuples as lists.
            item = typing.get_args(option)[0]
            if typing.get_origin(item) is tuple and isinstance(value, (list, tuple)):
                # Nested tuples (anyres.image_grid_pinpoints): each item checked alike.
                inner = [_coerce(item, v, where, problems) for v in value]
                return UNPARSED if any(v is UNPARSED for v in inner) else tuple(inner)
            if isinstance(value, (list, tuple)) and all(isinstance(v, item) and not isinstance(v, bool)
                                                         for v in value):
                return tuple(value)
        elif typing.get_origin(option) is list:
            if isinstance(value, str):
                return value.split()
            if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
                return [str(v) for v in value]
        else:
            return value
    expected = " or ".join(_expected(o) for o in options)
    problems.append(f"{where}: expected {expected}, got {value!r}")
    return UNPARSED


def _expected(hint: Any) -> str:
    """How a problem names the values a type takes: "int", "one of 'a', 'b'"."""
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return getattr(hint, "__name__", str(hint))


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


def _default_text(spec: dataclasses.Field) -> str:
    """How --help states a field's default, once: its `default_help` ("--lr": defaults to --lr), else
    the value; None (not set) says nothing, the help text tells what happens then."""
    shown = spec.metadata.get("default_help")
    if shown is None and spec.default is not None:
        shown = spec.default
    return "" if shown is None else f" (default: {shown})"


class _FlagError(Exception):
    """An argv problem argparse cannot step over (a flag without its value)."""


class _FlagParser(argparse.ArgumentParser):
    """Raises instead of printing the usage and exiting: under torchrun every rank parses, and the
    problem is listed with all the others (megamm.train prints them once)."""

    def error(self, message: str) -> NoReturn:
        raise _FlagError(message)


@dataclasses.dataclass(frozen=True)
class _Invalid:
    """A flag value that did not convert; `_parse_flags` reports it and the field becomes UNPARSED."""

    text: str
    expected: str


class _Converter:
    """argparse `type=`: the value, or `_Invalid` (argparse would stop at the first wrong value)."""

    def __init__(self, hint: Any) -> None:
        self.hint = hint
        self.__name__ = getattr(hint, "__name__", "value")

    def __call__(self, text: str) -> Any:
        if typing.get_origin(self.hint) is Literal:
            return text if text in typing.get_args(self.hint) else _Invalid(text, _expected(self.hint))
        try:
            return self.hint(text)
        except ValueError:
            return _Invalid(text, _expected(self.hint))


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations (as Megatron): `--lr-warmup` must not silently mean --lr-warmup-iters, and an
    # unknown flag is reported as one.
    parser = _FlagParser(
        prog="python -m megamm.train",
        description="Train a LlavaModel with tensor, sequence and data parallelism (launch with torchrun).",
        allow_abbrev=False, exit_on_error=False,
    )
    parser.add_argument(
        "--config", type=Path, action="append", default=[], metavar="YAML",
        help="YAML file with model, parallel and training sections; repeatable, later files win field by field",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="PATH=VALUE",
        help="override any config field, e.g. model.language.transformer.num_layers=4 (repeatable)",
    )
    groups = {
        ParallelConfig: parser.add_argument_group("parallelism"),
        TrainingConfig: parser.add_argument_group("training"),
    }
    parallel_help = {
        "tensor_model_parallel_size": "tensor-parallel ranks per model replica",
        "pipeline_model_parallel_size": "pipeline stages per model replica",
        "sequence_parallel": "split norms/dropout along the sequence across tp ranks",
        "context_parallel_size": "context-parallel ranks splitting each sequence (ring attention)",
        "distributed_timeout_minutes": "collective timeout before a stuck job fails",
        "num_layers_per_virtual_pipeline_stage": "language layers per virtual stage (interleaved 1F1B)",
        "decoder_first_pipeline_num_layers": "language layers on the first pipeline stage (uneven split)",
        "decoder_last_pipeline_num_layers": "language layers on the last pipeline stage (uneven split)",
    }
    for cls, group in groups.items():
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            help_text = (spec.metadata.get("help") or parallel_help.get(spec.name, "")) + _default_text(spec)
            kwargs: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS, "help": help_text}
            hint = hints[spec.name]
            if hint is bool or hint == bool | None:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(base_hint := _without_none(hint)) is Literal:
                # Checked by the converter (argparse's choices= would stop at the first wrong value).
                kwargs["type"] = _Converter(base_hint)
                kwargs["metavar"] = "{" + ",".join(typing.get_args(base_hint)) + "}"
            elif list[str] in typing.get_args(hint):
                kwargs["nargs"] = "+"
            else:
                base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
                kwargs["type"] = _Converter(base[0])
            group.add_argument(_flag_name(spec), **kwargs)
    return parser


_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # argparse's test: "-1" is a value, not a flag


def _takes_no_value(tokens: list[str], index: int) -> bool:
    """True when the flag at `index` has no value after it (the end, or another flag follows)."""
    following = tokens[index + 1] if index + 1 < len(tokens) else None
    return following is None or (following.startswith("-") and not _NUMBER.match(following))


def _offending(tokens: list[str], error: argparse.ArgumentError) -> int | None:
    """The index of the token argparse stopped at: the first occurrence of the flag that lacks its
    value, or that carries `=value` it does not take."""
    names = (error.argument_name or "").split("/")
    for index, token in enumerate(tokens):
        name, equals, _ = token.partition("=")
        if name in names and (equals or _takes_no_value(tokens, index)):
            return index
    return None


def _unknown(argv: list[str], extras: list[str], flags: list[str]) -> list[str]:
    """Problems for the tokens argparse left over: unknown flags (with the closest known one) and
    stray values; the values that follow an unknown flag are its own."""
    problems, position, after_unknown = [], 0, False
    for token in argv:
        if position < len(extras) and token == extras[position]:
            position += 1
            if token.startswith("-") and not _NUMBER.match(token):
                name = token.partition("=")[0]
                close = difflib.get_close_matches(name, flags, n=1)
                problems.append(f"{name}: unknown flag" + (f" (did you mean {close[0]}?)" if close else ""))
                after_unknown = True
            elif not after_unknown:
                problems.append(f"{token!r}: unexpected argument (every setting is a --flag)")
        else:
            after_unknown = False
    return problems


def _parse_flags(argv: list[str]) -> tuple[dict[str, Any], list[str], bool]:
    """(the flags given, by field name; their problems; whether every token was read).

    Every problem at once: unknown flags, each wrong value (its field becomes UNPARSED), a flag
    missing its value (the token is dropped and the rest read again)."""
    parser = build_parser()
    flags = [name for action in parser._actions for name in action.option_strings]
    tokens, problems = list(argv), []
    while True:
        try:
            namespace, extras = parser.parse_known_args(tokens)
            break
        except argparse.ArgumentError as error:
            problems.append(f"{error.argument_name}: {error.message}")
            index = _offending(tokens, error)
            if index is None:
                return {}, problems, False
            del tokens[index]
        except _FlagError as error:
            return {}, [*problems, str(error)], False
    problems += _unknown(tokens, extras, flags)
    args = vars(namespace)
    for name, value in args.items():
        if isinstance(value, _Invalid):
            flag = next(a.option_strings[0] for a in parser._actions if a.dest == name)
            problems.append(f"{flag}: expected {value.expected}, got {value.text!r}")
            args[name] = UNPARSED
    return args, problems, True


def _merge(base: dict, update: dict) -> dict:
    """`update` over `base`, section by section: nested mappings merge, other values replace."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml_tree(paths: list[Path]) -> dict:
    """The config tree of YAML files read in order, later files winning field by field (ConfigError
    naming an unreadable file)."""
    tree: dict = {}
    for path in paths:
        try:
            part = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError([f"--config {path}: {error}"]) from error
        if not isinstance(part, dict):
            raise ConfigError([f"--config {path}: expected a mapping of sections, got {type(part).__name__}"])
        tree = _merge(tree, part)
    return tree


def _differences(ours: Any, theirs: Any, path: str) -> list[tuple[str, Any, Any]]:
    """(field path, our value, their value) for every leaf where two config trees differ."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [d for key in sorted(ours.keys() | theirs.keys())
                for d in _differences(ours.get(key), theirs.get(key), f"{path}.{key}")]
    return [] if ours == theirs else [(path, ours, theirs)]


def _checkpoint_model(tree: dict, saved_config: SavedConfig | None,
                      problems: list[str]) -> tuple[str, str, dict] | None:
    """(the flag, the checkpoint it names, the model tree that checkpoint saved), or
    None when the run loads nothing (yet). --load wins; a LoRA run without it takes its model from
    --pretrained-checkpoint (its base)."""
    training = tree.get("training") or {}
    flag, load = next(((f, training.get(k)) for f, k in (("--load", "load"), ("--pretrained-checkpoint",
                                                                               "pretrained_checkpoint"))
                       if isinstance(training.get(k), str)), (None, None))
    if load is None or saved_config is None:
        return None
    try:
        saved = saved_config(load)
    except (OSError, ValueError, TypeError) as error:
        problems.append(f"{flag} {load}: {error}")
        return None
    if saved is None:
        return None
    model = saved.get("model")
    if not isinstance(model, dict):
        problems.append(f"{flag} {load}: the checkpoint's saved config has no model section")
        return None
    return flag, load, model


def _disagreements(config: RunConfig, flag: str, load: str, saved_model: dict) -> list[str]:
    """One problem per model field where the run's model differs from the checkpoint's that `flag`
    (--load, --pretrained-checkpoint) names (or the problems of the saved model section)."""
    problems: list[str] = []
    saved = _build(LlavaConfig, saved_model, f"{flag} {load}: model", problems)
    if saved is None:
        return problems
    return problems + [
        f"{path}: the config says {ours!r}, checkpoint {load} has {theirs!r} "
        "(leave the model section out to use the checkpoint's)"
        for path, ours, theirs in _differences(_without_set_by(config.model), _without_set_by(saved), "model")
    ]


def read_run_config(
    argv: list[str] | None, world_size: int, saved_config: SavedConfig | None = None
) -> tuple[RunConfig | None, list[str]]:
    """Flags (and the YAML files they name) -> (the RunConfig, every problem found).

    The config is None when it could not be built (no model, a section that is not a mapping, an
    unreadable file, argv that could not be read); otherwise it is built even with problems, a wrong
    value standing as UNPARSED, so that callers can add their own checks of the fields that did
    parse. `saved_config(load)` reads the run config a checkpoint saved (see the module docstring);
    without it, --load does not supply or check the model section."""
    args, problems, complete = _parse_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        tree = read_yaml_tree(args.pop("config", []))
    except ConfigError as error:
        return None, problems + error.problems
    yaml_model = "model" in tree
    for item in args.pop("set", []):
        if "=" not in item:
            problems.append(f"--set {item}: expected PATH=VALUE")
            continue
        path, raw = item.split("=", 1)
        _set_path(tree, path, raw, problems)
    if not complete:
        return None, problems
    parallel_fields = {f.name for f in dataclasses.fields(ParallelConfig)}
    for name, value in args.items():
        section = "parallel" if name in parallel_fields else "training"
        tree.setdefault(section, {})[name] = value
    checkpoint = _checkpoint_model(tree, saved_config, problems)
    if checkpoint is not None and not yaml_model:
        # --set model.* lands on the checkpoint's model (and is then checked against it like YAML).
        tree["model"] = _merge(checkpoint[2], tree.get("model") or {})
    if "model" not in tree:
        load = (tree.get("training") or {}).get("load")
        source = f"--load {load} holds no checkpoint to take it from" if isinstance(load, str) else "or --load a checkpoint"
        problems.append(f"model: missing; give a --config file with a model section ({source})")
        return None, problems
    config = _build(RunConfig, tree, "config", problems)
    if config is None:
        return None, problems
    problems += gather(
        lambda: _disagreements(config, *checkpoint) if checkpoint is not None else [],
        lambda: config.problems(world_size),
    )
    return config, problems


def parse_run_config(argv: list[str] | None, world_size: int, saved_config: SavedConfig | None = None) -> RunConfig:
    """`read_run_config`'s config, or ConfigError listing every problem."""
    config, problems = read_run_config(argv, world_size, saved_config)
    if problems:
        raise ConfigError(problems)
    return config
