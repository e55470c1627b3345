"""Packaging for megamm. `pip install -e .[test]` installs the package and the test tools."""

import os
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup

ROOT = Path(__file__).parent


def read_requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def extensions() -> list[Extension]:
    """The optional C++ sample packer (megamm._packing); megamm.data.packing falls back to Python.

    pybind11 comes from [build-system] requires in pyproject.toml (isolated builds); a build without
    it (e.g. --no-build-isolation in an environment lacking it) skips the extension instead of failing,
    and `optional=True` makes a failed compile a warning, not a failed install.
    """
    try:
        import pybind11
    except ImportError:
        print("megamm: pybind11 not found, building without the C++ packing extension", file=sys.stderr)
        return []
    if sys.platform == "win32":
        flags = ["/std:c++17", "/O2"]
    else:
        flags = ["-std=c++17", "-O3", "-fvisibility=hidden"]
    return [
        Extension(
            "megamm._packing",
            sources=["megamm/csrc/packing.cpp"],
            include_dirs=[pybind11.get_include()],
            language="c++",
            extra_compile_args=flags,
            optional=True,
        )
    ]


CUDA_SOURCES = [
    "megamm/csrc/kernels_torch.cpp",
    *sorted(str(path.relative_to(ROOT)) for path in (ROOT / "megamm/csrc").glob("*.cu")),
]


def cuda_extensions() -> tuple[list, dict]:
    """The fused CUDA kernels (megamm._kernels_cuda) and the build_ext command they need.

    MEGAMM_BUILD_CUDA=1 requires them (a failure stops the install), 0 skips them, auto (the
    default) builds them when torch with CUDA and nvcc are importable/found at build time. torch is
    only visible to an isolated build if installed with it, so use `pip install --no-build-isolation`.
    Without the module, megamm.kernels builds them just in time on first use, or runs the references.
    """
    mode = os.environ.get("MEGAMM_BUILD_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"MEGAMM_BUILD_CUDA={mode!r}: expected 0, 1 or auto")
    if mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        problem = "torch is not importable at build time (pip install --no-build-isolation)"
    else:
        problem = None
        if torch.version.cuda is None:
            problem = f"torch {torch.__version__} has no CUDA"
        elif CUDA_HOME is None:
            problem = "nvcc not found (set CUDA_HOME)"
    if problem is not None:
        if mode == "1":
            raise SystemExit(f"MEGAMM_BUILD_CUDA=1 but the CUDA kernels cannot be built: {problem}")
        print(f"megamm: building without the CUDA kernels: {problem}", file=sys.stderr)
        return [], {}
    flags = ["-O3", "-std=c++17"]
    extension = CUDAExtension(
        "megamm._kernels_cuda",
        sources=CUDA_SOURCES,
        include_dirs=[str(ROOT / "megamm/csrc")],
        extra_compile_args={"cxx": flags, "nvcc": flags},
    )
    return [extension], {"build_ext": BuildExtension}


CUDA_EXTENSIONS, CMDCLASS = cuda_extensions()
# Optional data formats (docs/data.md): Parquet / Arrow tables, and Megatron-Energon datasets. Energon
# 7.x needs torch but accepts the installed one (no second torch is pulled).
PARQUET = ["pyarrow>=14"]
ENERGON = ["megatron-energon>=7,<8"]
# Video files for the native-resolution family (frame lists need nothing extra).
VIDEO = ["av>=12"]
# Hugging Face PEFT: exchanging LoRA adapters (megamm.convert.peft); transformers comes with the test extra.
PEFT = ["peft>=0.13"]
# Weights & Biases logging (--wandb-project).
WANDB = ["wandb>=0.17"]

setup(
    name="megamm",
    version="0.1.0",
    description="Megatron-style 3D-parallel training for LLaVA-style vision-language models",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megamm", "megamm.*"]),
    python_requires=">=3.10",
    install_requires=read_requirements(),
    ext_modules=extensions() + CUDA_EXTENSIONS,
    cmdclass=CMDCLASS,
    # The kernel sources ship with the package for the just-in-time build (megamm.kernels.build).
    package_data={"megamm": ["csrc/*.cu", "csrc/*.h", "csrc/kernels_*.cpp"]},
    extras_require={
        "test": [
            "pytest>=8", "pytest-timeout>=2.3", "transformers>=4.46,<6", "ruff>=0.6", "tensorboard>=2.14",
            "import-linter>=2.1", *PARQUET, "datasets>=2.19", *ENERGON, *VIDEO, *PEFT, *WANDB,
        ],
        "tensorboard": ["tensorboard>=2.14"],
        "parquet": PARQUET,
        "energon": ENERGON,
        "video": VIDEO,
        "peft": PEFT,
        "wandb": WANDB,
    },
)
