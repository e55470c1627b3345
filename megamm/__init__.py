"""megamm: Megatron-style 3D-parallel training for LLaVA-style vision-language models."""

__version__ = "0.1.0"
