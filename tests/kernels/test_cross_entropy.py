"""Vocab-parallel cross entropy at tp=2 with logits far outside exp's fp32 range.

`megamm.parallel.cross_entropy.vocab_parallel_cross_entropy` (math: `megamm.kernels.reference`) never
builds the full `[..., V]` logits on one rank: each tp rank holds a slice of the vocabulary, and the
max, the sum of exponentials and the target logit are combined with all-reduces. Subtracting the
global max before `exp` is what keeps it finite: fp32 `exp` overflows above ~88.7 (exp(95) = 1.8e41
> 3.4e38) and underflows to 0 below ~-103 (exp(-200) = 1.4e-87), so a row whose logits are ~95 would
give inf / nan and a row whose logits are all ~-200 would give log(0) = -inf without it. Real
models do produce logits of this size (a confident, late-training LM head; bf16 logits).

One spawned 2-process gloo run computes the loss and the gradient of a weighted loss sum for fp32
and bf16 logits; the test compares them with `torch.nn.functional.cross_entropy` on the gathered
full logits (real vocabulary columns only) and its autograd gradient. The vocabulary is 13 padded to
16, so rank 1 also holds 3 padding columns, set larger than any real logit: they must neither change
the loss nor get gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed

VOCAB = 13
PADDED = 16
TP = 2
SHAPE = (4, 3)  # [s, b] token positions


def _logits_and_targets() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full padded logits `[4, 3, 16]` (same on every rank), targets `[4, 3]`, loss weights `[4, 3]`.

    Rows (positions) of different kinds, with the max on either rank and targets on either rank:
    moderate logits; one logit at ~95 (on rank 0, then on rank 1); every logit at ~95; every logit at
    ~-200; a mix of ~95 and ~-200 (target on a -200 column: loss ~295, finite); an ignored target."""
    generator = torch.Generator().manual_seed(3)
    logits = 2.0 * torch.randn(*SHAPE, PADDED, generator=generator)
    noise = torch.randn(*SHAPE, PADDED, generator=generator)
    logits[0, 1, 2] = 95.0  # max on rank 0 (columns 0-7), target on rank 1 below
    logits[0, 2, 11] = 96.5  # max on rank 1 (columns 8-15)
    logits[1, 0] = 95.0 + noise[1, 0]  # every logit ~95
    logits[1, 1] = -200.0 + noise[1, 1]  # every logit ~-200
    logits[1, 2] = torch.where(torch.arange(PADDED) % 2 == 0, 95.0 + noise[1, 2], -200.0 + noise[1, 2])
    logits[2, 0, :8] = -200.0 + noise[2, 0, :8]  # rank 0's half ~-200, rank 1's half ~95
    logits[2, 0, 8:] = 95.0 + noise[2, 0, 8:]
    logits[3, :, 4] = 94.0
    logits[..., VOCAB:] = 120.0  # padding columns, above every real logit
    target = torch.tensor([[5, 9, 11], [3, 7, 1], [2, 0, 12], [4, 10, 6]])
    target[2, 1] = -100  # ignored
    weights = torch.rand(*SHAPE, generator=generator) + 0.5
    return logits, target, weights


def _job() -> dict[str, dict[str, torch.Tensor]]:
    """On each of the 2 tp ranks: loss and gradient of (loss * weights).sum() w.r.t. this rank's slice."""
    from megamm.kernels.cross_entropy import vocab_parallel_cross_entropy
    from megamm.parallel.state import initialize_parallel_state

    state = initialize_parallel_state(tensor_model_parallel_size=TP)
    logits, target, weights = _logits_and_targets()
    width = PADDED // TP
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        local = logits[..., state.tp_rank * width : (state.tp_rank + 1) * width].to(dtype).requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target, VOCAB, state.tp_group)
        (loss * weights).sum().backward()
        results[str(dtype)] = {"loss": loss.detach(), "grad": local.grad.float()}
    return results


@pytest.fixture(scope="module")
def per_rank() -> list[dict[str, dict[str, torch.Tensor]]]:
    return run_distributed(_job, TP)


def _reference(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's cross entropy on the full logits (as `dtype` values, computed in fp32), real columns."""
    logits, target, weights = _logits_and_targets()
    full = logits.to(dtype).float().requires_grad_()
    loss = F.cross_entropy(full[..., :VOCAB].reshape(-1, VOCAB), target.reshape(-1), reduction="none",
                           ignore_index=-100).view(SHAPE)
    (loss * weights).sum().backward()
    return loss.detach(), full.grad


def test_fixture_needs_the_max_subtraction() -> None:
    """Without subtracting the max, these logits overflow / underflow fp32 exp: the test bites."""
    logits, _, _ = _logits_and_targets()
    assert torch.isinf(logits[1, 0, :VOCAB].exp()).all()
    assert (logits[1, 1, :VOCAB].exp() == 0).all()
    assert logits[..., :VOCAB].max() > 95 and logits[..., :VOCAB].min() < -200


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vocab_parallel_loss_is_finite_and_matches_torch(per_rank, dtype: torch.dtype) -> None:
    """Both ranks return the same finite loss, equal to torch's on the gathered logits (zero where
    ignored); the loss of the ~295 row really is large."""
    expected, _ = _reference(dtype)
    for rank, results in enumerate(per_rank):
        loss = results[str(dtype)]["loss"]
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all(), f"rank {rank}: {loss}"
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert per_rank[0][str(dtype)]["loss"][2, 1] == 0.0
    assert expected.max() > 250  # the target on a ~-200 column next to ~95 ones


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vocab_parallel_gradient_matches_torch(per_rank, dtype: torch.dtype) -> None:
    """The rank slices of the gradient, joined, equal torch's gradient; padding columns get none.

    bf16: the gradient lands in bf16 (the logits' dtype), so it is compared to bf16 precision."""
    _, expected = _reference(dtype)
    grad = torch.cat([results[str(dtype)]["grad"] for results in per_rank], dim=-1)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[..., VOCAB:], torch.zeros_like(grad[..., VOCAB:]))
    tolerance = 1e-6 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(grad, expected.to(dtype).float(), rtol=tolerance, atol=tolerance)
