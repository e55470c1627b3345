"""Loading the CUDA extension: the ahead-of-time build from setup.py, else a just-in-time build.

1. `megamm._kernels_cuda`, built by `pip install` when CUDA is present (setup.py, MEGAMM_BUILD_CUDA).
2. Otherwise `torch.utils.cpp_extension.load` compiles the same sources into a cache directory
   (`MEGAMM_KERNELS_CACHE`, default `~/.cache/megamm/kernels`), in a subdirectory named by a hash of
   the sources, the torch and CUDA versions and the target architectures, so a changed source never
   loads a stale build. A file lock serializes the build on a node: the first rank to take it
   builds, the others wait and then load the finished module (ninja finds nothing to do).
3. Neither possible: `KernelBuildError`, saying what is missing and how to get the kernels or run
   without them (`MEGAMM_KERNELS=reference`).

The outcome, module or error, is cached for the process.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
AOT_MODULE = "megamm._kernels_cuda"
CACHE_ENV = "MEGAMM_KERNELS_CACHE"


class KernelBuildError(RuntimeError):
    """The fused kernels' extension could not be imported or built."""


def sources() -> list[Path]:
    """The torch glue and every kernel file, in a stable order."""
    return [CSRC / "kernels_torch.cpp", *sorted(CSRC.glob("*.cu"))]


def _headers() -> list[Path]:
    return sorted(CSRC.glob("*.h"))


def build_tag() -> str:
    """Hash of everything that changes the compiled module."""
    digest = hashlib.sha256()
    for path in sources() + _headers():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{arch}".encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "megamm" / "kernels"
    return Path(root)


def jit_problem() -> str | None:
    """Why a just-in-time build cannot work here, or None if it can be tried."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    if CUDA_HOME is None or shutil.which("nvcc", path=str(Path(CUDA_HOME) / "bin")) is None:
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit matching torch.version.cuda)"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _jit_build() -> ModuleType:
    problem = jit_problem()
    if problem is not None:
        raise KernelBuildError(problem)
    import fcntl

    from torch.utils.cpp_extension import load

    tag = build_tag()
    directory = cache_dir() / tag
    directory.mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f"{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return load(
                name=f"megamm_kernels_{tag}",
                sources=[str(path) for path in sources()],
                extra_include_paths=[str(CSRC)],
                extra_cflags=["-O3", "-std=c++17"],
                extra_cuda_cflags=["-O3", "-std=c++17"],
                build_directory=str(directory),
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_result: ModuleType | KernelBuildError | None = None


def load_extension() -> ModuleType:
    """The extension module; raises `KernelBuildError` (the same one on every call) if unavailable."""
    global _result
    if _result is None:
        try:
            _result = importlib.import_module(AOT_MODULE)
        except ImportError as aot_error:
            try:
                _result = _jit_build()
            # KernelBuildError (nothing to build with), RuntimeError (failed compile), OSError or
            # CalledProcessError (toolchain), ImportError (the built module does not load).
            except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as jit_error:
                _result = KernelBuildError(
                    "megamm fused CUDA kernels are unavailable.\n"
                    f"  ahead-of-time module {AOT_MODULE}: {aot_error}\n"
                    f"  just-in-time build: {jit_error}\n"
                    "  To get them: on a machine with CUDA and nvcc, `MEGAMM_BUILD_CUDA=1 pip install "
                    "--no-build-isolation -e .`, or let the first use build them (CUDA_HOME, ninja). "
                    "To run without them: MEGAMM_KERNELS=reference."
                )
                _result.__cause__ = jit_error
    if isinstance(_result, KernelBuildError):
        raise _result
    return _result


def reset() -> None:
    """Forget the cached outcome (tests; or after installing the toolchain in a live process)."""
    global _result
    _result = None
