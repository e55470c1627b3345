"""Packaging for megamm. `pip install -e .[test]` installs the package and the test tools."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def read_requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="megamm",
    version="0.1.0",
    description="Megatron-style 3D-parallel training for LLaVA-style vision-language models",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megamm", "megamm.*"]),
    python_requires=">=3.10",
    install_requires=read_requirements(),
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "transformers>=4.46,<6", "ruff>=0.6", "tensorboard>=2.14"],
        "tensorboard": ["tensorboard>=2.14"],
    },
)
