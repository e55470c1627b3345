"""tests/gpu: the fused CUDA kernels against their torch references on a real GPU.

Skipped only where CUDA is absent. On a GPU machine the kernels must build (ahead of time, or just in
time into MEGAMM_KERNELS_CACHE): a build failure fails these tests instead of skipping them.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def require_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
