"""tests/gpu: attention within segments on torch's variable-length flash kernel equals the
block-diagonal mask with SDPA (the path every CPU test takes). Skipped only where CUDA is absent."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megamm.transformer.segments import Segments

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def require_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")


def test_varlen_kernel_equals_block_diagonal_mask() -> None:
    segments = Segments((24, 24, 16, 16, 7))
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, segments.total, 64, device="cuda", generator=generator, dtype=torch.bfloat16)
               for _ in range(3))
    assert segments.uses_varlen(q, dropout=0.0), "this torch has no variable-length kernel for bf16 on CUDA"
    out = segments.varlen_attention(q, k, v)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=segments.mask(q.device))
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
