"""The Python side of the fused kernels, on the CPU: the autograd wrappers of megamm.kernels.fused
driven by `TorchContract`, a torch implementation of each CUDA launcher's contract (kernels.h),
arithmetic included. Checks that the wrappers reshape, save and return gradients correctly, that the
backward formulas the kernels implement equal autograd of the references, and that the cross
entropy's per-rank statistics combine across tp ranks to the single-rank loss (2 gloo processes).
The CUDA kernels themselves are tested against the references in tests/gpu."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megamm.kernels import fused, reference
from megamm.parallel.state import initialize_parallel_state
from tests.distributed import run_distributed


class TorchContract:
    """What each launcher of megamm/csrc/kernels.h computes, written with torch ops in fp32."""

    def rms_norm_forward(self, x, w, eps):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1) + eps)
        normed = (x32 * rstd[:, None]).to(x.dtype).float()
        return (w.float() * normed).to(x.dtype), rstd

    def rms_norm_backward(self, dy, x, w, rstd):
        g, x32, w32 = dy.float(), x.float(), w.float()
        n = x32 * rstd[:, None]
        mean_gn = (g * w32 * n).mean(-1, keepdim=True)
        dx = rstd[:, None] * (g * w32 - n * mean_gn)
        return dx.to(x.dtype), (g * n.to(x.dtype).float()).sum(0).to(w.dtype)

    def layer_norm_forward(self, x, w, b, eps):
        x32 = x.float()
        mean = x32.mean(-1)
        rstd = torch.rsqrt((x32 - mean[:, None]).pow(2).mean(-1) + eps)
        y = (x32 - mean[:, None]) * rstd[:, None] * w.float() + b.float()
        return y.to(x.dtype), mean, rstd

    def layer_norm_backward(self, dy, x, w, mean, rstd):
        g, w32 = dy.float(), w.float()
        xhat = (x.float() - mean[:, None]) * rstd[:, None]
        gw = g * w32
        dx = rstd[:, None] * (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), (g * xhat).sum(0).to(w.dtype), g.sum(0).to(w.dtype)

    def rotary(self, x, cos, sin, backward):
        x1, x2 = x.float().chunk(2, -1)
        c1, c2 = cos.chunk(2, -1)
        s1, s2 = sin.chunk(2, -1)
        if backward:
            out = torch.cat([x1 * c1 + x2 * s2, x2 * c2 - x1 * s1], -1)
        else:
            out = torch.cat([x1 * c1 - x2 * s1, x2 * c2 + x1 * s2], -1)
        return out.to(x.dtype).contiguous()

    def swiglu_forward(self, x):
        g, u = x.float().chunk(2, -1)
        return (F.silu(g).to(x.dtype).float() * u).to(x.dtype)

    def swiglu_backward(self, dy, x):
        g, u = x.float().chunk(2, -1)
        d, s = dy.float(), torch.sigmoid(g)
        return torch.cat([d * u * s * (1 + g * (1 - s)), d * g * s], -1).to(x.dtype)

    def _z(self, x, bias):
        return x.float() if bias is None else (x + bias).float()

    def bias_activation_forward(self, x, bias, kind):
        z = self._z(x, bias)
        if kind == 2:
            s = torch.sigmoid((1.702 * z).to(x.dtype).float()).to(x.dtype).float()
            return (z * s).to(x.dtype)
        return F.gelu(z, approximate="tanh" if kind == 1 else "none").to(x.dtype)

    def bias_activation_backward(self, dy, x, bias, kind):
        z, d = self._z(x, bias), dy.float()
        if kind == 0:
            grad = 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        elif kind == 1:
            k = math.sqrt(2 / math.pi)
            t = torch.tanh(k * (z + 0.044715 * z**3))
            grad = 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)
        else:
            s = torch.sigmoid(1.702 * z)
            grad = s + z * 1.702 * s * (1 - s)
        return (d * grad).to(x.dtype)

    def softmax_forward(self, scores, mask, scale, causal):
        return reference.scaled_masked_softmax(scores, mask, scale, causal)

    def softmax_backward(self, dy, y, scale):
        d, p = dy.float(), y.float()
        return (scale * p * (d - (d * p).sum(-1, keepdim=True))).to(y.dtype)

    def cross_entropy_forward(self, logits, target, valid):
        x = logits[:, :valid].float()
        if valid == 0:
            rows = logits.shape[0]
            return torch.full((rows,), float("-inf")), torch.zeros(rows), torch.zeros(rows)
        row_max = x.max(-1).values
        sum_exp = (x - row_max[:, None]).exp().sum(-1)
        target_logit = x.gather(-1, target.clamp(min=0)[:, None]).squeeze(-1).masked_fill(target < 0, 0.0)
        return row_max, sum_exp, target_logit

    def cross_entropy_backward(self, logits, target, row_max, sum_exp, grad_loss, valid):
        x = logits.float()
        grad = (x - row_max[:, None]).exp() / sum_exp[:, None]
        grad[:, valid:] = 0.0
        onehot = F.one_hot(target.clamp(min=0), x.shape[1]).float() * (target >= 0).float()[:, None]
        return ((grad - onehot) * grad_loss[:, None]).to(logits.dtype)


@pytest.fixture(autouse=True)
def contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "load_extension", TorchContract)


def _outputs_and_grads(fn, *inputs: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves if leaf.requires_grad]


def _assert_same(fused_fn, reference_fn, *inputs: torch.Tensor, tol: float = 1e-5) -> None:
    got, want = _outputs_and_grads(fused_fn, *inputs), _outputs_and_grads(reference_fn, *inputs)
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, index
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"output/grad {index}")


G = torch.Generator().manual_seed(0)


def test_norm_wrappers() -> None:
    x, w, b = torch.randn(3, 5, 24, generator=G), torch.randn(24, generator=G), torch.randn(24, generator=G)
    _assert_same(lambda x, w: fused.RMSNorm.apply(x, w, 1e-5), lambda x, w: reference.rms_norm(x, w, 1e-5), x, w)
    _assert_same(
        lambda x, w, b: fused.LayerNorm.apply(x, w, b, 1e-5),
        lambda x, w, b: reference.layer_norm(x, w, b, 1e-5),
        x, w, b,
    )


def test_rotary_wrapper_with_a_strided_view_and_broadcast_tables() -> None:
    qkv = torch.randn(6, 2, 3 * 4 * 8, generator=G)
    angles = torch.randn(6, 1, 1, 4, generator=G)  # one table for both samples, broadcast over b
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def view(t: torch.Tensor) -> torch.Tensor:
        return t[..., 32:64].view(6, 2, 4, 8)  # the k part of a fused projection: not contiguous

    _assert_same(
        lambda t: fused.Rotary.apply(view(t), cos, sin), lambda t: reference.apply_rotary(view(t), cos, sin), qkv
    )


def test_activation_wrappers() -> None:
    x, bias = torch.randn(4, 3, 10, generator=G), torch.randn(10, generator=G)
    _assert_same(fused.SwiGLU.apply, reference.swiglu, x)
    for kind, ref in [
        ("gelu", reference.gelu),
        ("gelu_tanh", lambda x, b=None: reference.gelu(x, b, "tanh")),
        ("quick_gelu", reference.quick_gelu),
    ]:
        _assert_same(lambda x, b, kind=kind: fused.BiasActivation.apply(x, b, kind), ref, x, bias)
        _assert_same(lambda x, kind=kind: fused.BiasActivation.apply(x, None, kind), ref, x)


def test_softmax_wrapper() -> None:
    scores = torch.randn(2, 3, 5, 7, generator=G)
    mask = torch.rand(2, 1, 5, 7, generator=G) > 0.3
    for causal in (True, False):
        _assert_same(
            lambda s, c=causal: fused.ScaledMaskedSoftmax.apply(s, mask, 0.3, c),
            lambda s, c=causal: reference.scaled_masked_softmax(s, mask, 0.3, c),
            scores,
        )


def test_cross_entropy_wrapper_single_rank() -> None:
    logits = torch.randn(4, 3, 16, generator=G)
    target = torch.tensor([[1, 2, -100], [13, 0, 3], [-100, -100, 5], [7, 8, 9]])
    _assert_same(
        lambda x: fused.VocabParallelCrossEntropy.apply(x, target, 14, None),
        lambda x: reference.vocab_parallel_cross_entropy(x, target, 14, None),
        logits,
    )


def _tp_cross_entropy(vocab_sizes: list[int]) -> list[list[torch.Tensor]]:
    """On each of 2 tp ranks, per vocabulary size: loss and logits grad of its vocabulary half,
    fused then reference."""
    fused.load_extension = TorchContract  # a spawned process does not see the fixture
    state = initialize_parallel_state(tensor_model_parallel_size=2)
    g = torch.Generator().manual_seed(3)
    full = torch.randn(5, 2, 16, generator=g) * 4
    out = []
    for vocab_size in vocab_sizes:
        target = torch.randint(0, vocab_size, (5, 2), generator=g)
        target[0, 1] = -100
        shard = full.chunk(2, -1)[state.tp_rank]
        results = []
        for fn in (fused.VocabParallelCrossEntropy.apply, reference.vocab_parallel_cross_entropy):
            logits = shard.clone().requires_grad_()
            loss = fn(logits, target, vocab_size, state.tp_group)
            loss.backward(torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape))
            results += [loss.detach(), logits.grad]
        out.append(results)
    return out


def test_cross_entropy_statistics_combine_over_tp() -> None:
    """Vocabulary 13 (padding inside rank 1's shard) and 7 (rank 1's whole shard is padding)."""
    per_rank = run_distributed(_tp_cross_entropy, 2, [13, 7])
    for case in range(2):
        for rank in range(2):
            fused_loss, fused_grad, ref_loss, ref_grad = per_rank[rank][case]
            torch.testing.assert_close(fused_loss, ref_loss, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fused_grad, ref_grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(per_rank[0][case][0], per_rank[1][case][0], rtol=0, atol=0)
