"""Parameter precisions by name: the one map from "fp32" / "bf16" / "fp16" to torch dtypes.

Training (--bf16 / --fp16), generation (--dtype, or what the run trained in), conversion (--dtype)
and the tools all name precisions this way, so they read the same table.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_name(bf16: bool, fp16: bool) -> str:
    """The precision the training flags --bf16 / --fp16 select ("fp32" with neither)."""
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def dtype_named(name: str, where: str = "dtype") -> torch.dtype:
    """The torch dtype of precision `name`; ValueError naming `where` (the flag or field) otherwise."""
    if name not in DTYPES:
        raise ValueError(f"{where} must be one of {', '.join(sorted(DTYPES))}, got {name!r}")
    return DTYPES[name]
