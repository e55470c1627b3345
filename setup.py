"""Packaging for megamm. `pip install -e .[test]` installs the package and the test tools."""

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


setup(
    name="megamm",
    version="0.1.0",
    description="Megatron-style 3D-parallel training for LLaVA-style vision-language models",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megamm", "megamm.*"]),
    python_requires=">=3.10",
    install_requires=read_requirements(),
    ext_modules=extensions(),
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=4.46,<6", "ruff>=0.6", "tensorboard>=2.14"],
        "tensorboard": ["tensorboard>=2.14"],
    },
)
