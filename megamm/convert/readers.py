"""The weight files of a source directory, read one tensor at a time.

Supported: safetensors (one file, or shards with `model.safetensors.index.json`) and PyTorch `.bin`
files (one, or shards with `pytorch_model.bin.index.json`), which are opened with
`torch.load(weights_only=True)` and memory-mapped, so no code from the file runs and a shard is not
read into memory as a whole.

Why one tensor at a time: a conversion must handle a model larger than half the machine's memory.
A safetensors file is opened for each read and closed right after, so the pages a read touched
are not kept mapped (and counted in the resident set) for the rest of the conversion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from megamm.convert import ConversionError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class WeightFiles:
    """Every tensor of a directory's weight files: `names`, `info(name)`, `get(name)`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConversionError(f"{self.directory}: no such directory")
        self.files = find_weight_files(self.directory)
        self._infos: dict[str, TensorInfo] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        for path in self.files:
            for name, info in self._scan(path).items():
                if name in self._infos:
                    raise ConversionError(
                        f"tensor {name} is in both {self._infos[name].file.name} and {path.name}"
                    )
                self._infos[name] = info

    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise ConversionError(f"{self.directory}: no tensor named {name}") from None

    def get(self, name: str) -> torch.Tensor:
        """The tensor, as stored (dtype unchanged), in memory of its own."""
        path = self.info(name).file
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as stream:
                return stream.get_tensor(name)
        return self._bin(path)[name].clone()

    def _scan(self, path: Path) -> dict[str, TensorInfo]:
        if path.suffix == ".safetensors":
            out = {}
            with safe_open(str(path), framework="pt") as stream:
                names = stream.keys()
                for name in names:
                    piece = stream.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise ConversionError(f"{path}: tensor {name} has unsupported dtype {piece.get_dtype()}")
                    out[name] = TensorInfo(path, tuple(piece.get_shape()), dtype)
            return out
        return {name: TensorInfo(path, tuple(t.shape), t.dtype) for name, t in self._bin(path).items()}

    def _bin(self, path: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is not None and self._bin_cache[0] == path:
            return self._bin_cache[1]
        self._bin_cache = None
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                # Files in the legacy (pre-zip) serialization cannot be memory-mapped.
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many types; all mean "unreadable"
            raise ConversionError(f"{path}: cannot be read as a weights-only PyTorch file: {error}") from error
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ConversionError(f"{path}: expected a flat mapping of names to tensors")
        self._bin_cache = (path, state)
        return state


def _from_index(directory: Path, index_name: str) -> list[Path]:
    index_path = directory / index_name
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConversionError(f"{index_path}: not a valid weight index ({error})") from error
    files = sorted({directory / name for name in weight_map.values()})
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise ConversionError(f"{index_path} names shard files that do not exist: {', '.join(missing)}")
    return files


def find_weight_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face style directory (safetensors preferred over .bin)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index_name).is_file():
            return _from_index(directory, index_name)
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(p for p in directory.glob(pattern) if p.is_file())
        if files:
            return files
    raise ConversionError(
        f"{directory}: no weight files (expected model.safetensors, sharded safetensors with "
        f"model.safetensors.index.json, or pytorch_model.bin)"
    )


def read_json(path: Path) -> dict:
    """A JSON file that must exist and hold an object."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing (every model directory needs its config file)") from None
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path}: not readable JSON ({error})") from error
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return value
