"""Every fused kernel against its torch reference over a grid of shapes and dtypes, forward and
backward, on the GPU (skipped without CUDA; see conftest.py).

Accuracy criterion. Kernel and reference both compute in fp32 from the same inputs and round the
result to the input dtype, but in different orders (reductions, fused multiply-adds, CUDA's expf and
rsqrtf). Comparing the two directly would need a tolerance guessed per op; instead both are measured
against a float64 "truth" evaluated on the same (already rounded) inputs, and the kernel passes if

    max|kernel - truth| <= 2 * max|reference - truth| + n * u * max(1, max|truth|)

with u the unit roundoff of the dtype (2^-24 fp32, 2^-8 bf16, 2^-11 fp16): the kernel may be at
most about as wrong as torch itself, plus a floor for when the reference happens to be (nearly)
exact. In bf16/fp16 the error is dominated by rounding the output (half an ulp, u relative), so
n = 4 roundings. In fp32 it is dominated by CUDA's transcendental functions (expf, erff, tanhf:
up to 2 ulp each, chained two or three deep in a backward formula) and by a different summation
order, so n = 64 (4e-6 relative), still far below any bf16-visible difference.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megamm import kernels
from megamm.kernels import fused, reference
from megamm.transformer.rope import RotaryEmbedding

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FLOOR_ROUNDINGS = {torch.float32: 64, torch.bfloat16: 4, torch.float16: 4}
DEVICE = "cuda"


def _ids(values) -> list[str]:
    return [str(v).replace(" ", "") for v in values]


def _grad_for(out: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(out.shape, generator=g, device=DEVICE).to(out.dtype)


def _run(fn, inputs: list[torch.Tensor], wants_grad: list[bool], seed: int, cast=None) -> list[torch.Tensor]:
    """fn's output and the grads of the inputs marked in wants_grad, for a fixed upstream grad."""
    leaves = []
    for t, grad in zip(inputs, wants_grad, strict=True):
        t = t.detach() if cast is None or not t.is_floating_point() else t.detach().to(cast)
        leaves.append(t.clone().requires_grad_(grad))
    out = fn(*leaves)
    upstream = _grad_for(out, seed)
    out.backward(upstream if cast is None else upstream.to(cast))
    return [out.detach()] + [leaf.grad for leaf, grad in zip(leaves, wants_grad, strict=True) if grad]


def check(kernel_fn, reference_fn, truth_fn, inputs: list[torch.Tensor], wants_grad: list[bool]) -> None:
    dtype = next(t.dtype for t in inputs if t.is_floating_point())
    got = _run(kernel_fn, inputs, wants_grad, seed=1)
    ref = _run(reference_fn, inputs, wants_grad, seed=1)
    truth = _run(truth_fn, inputs, wants_grad, seed=1, cast=torch.float64)
    names = ["output"] + [f"grad {i}" for i, grad in enumerate(wants_grad) if grad]
    for name, k, r, t in zip(names, got, ref, truth, strict=True):
        assert k.shape == r.shape and k.dtype == r.dtype, (name, k.shape, r.shape, k.dtype, r.dtype)
        assert torch.isfinite(k).all(), f"{name}: non-finite values"
        t = t.double()
        err_kernel = (k.double() - t).abs().max().item()
        err_reference = (r.double() - t).abs().max().item()
        floor = FLOOR_ROUNDINGS[dtype] * UNIT_ROUNDOFF[dtype] * max(1.0, t.abs().max().item())
        bound = 2 * err_reference + floor
        assert err_kernel <= bound, f"{name}: kernel error {err_kernel:.3g} > {bound:.3g} (torch: {err_reference:.3g})"


def _randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=DEVICE) * scale + shift).to(dtype)


@pytest.fixture(autouse=True)
def all_kernels():
    with kernels.kernel_mode("all"):
        yield


# --- norms ------------------------------------------------------------------------------------

NORM_SHAPES = [(1, 8), (3, 1000), (17, 1023), (5, 1, 4096), (64, 4096), (2, 37, 5120), (16, 16384), (1, 7)]


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=_ids(NORM_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_rms_norm(shape, dtype) -> None:
    x = _randn(*shape, dtype=dtype, seed=0, scale=2.0, shift=0.5)
    w = _randn(shape[-1], dtype=dtype, seed=1, shift=1.0)

    def truth(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

    check(lambda x, w: fused.RMSNorm.apply(x, w, 1e-5), lambda x, w: reference.rms_norm(x, w, 1e-5), truth,
          [x, w], [True, True])


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=_ids(NORM_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_layer_norm(shape, dtype) -> None:
    x = _randn(*shape, dtype=dtype, seed=0, scale=3.0, shift=2.0)  # a mean far from 0
    w = _randn(shape[-1], dtype=dtype, seed=1, shift=1.0)
    b = _randn(shape[-1], dtype=dtype, seed=2)

    def truth(x, w, b):
        return F.layer_norm(x, x.shape[-1:], w, b, 1e-5)

    check(lambda x, w, b: fused.LayerNorm.apply(x, w, b, 1e-5), lambda x, w, b: reference.layer_norm(x, w, b, 1e-5),
          truth, [x, w, b], [True, True, True])


# --- rotary -----------------------------------------------------------------------------------


def _truth_rotary(x, cos, sin):
    first, second = x.chunk(2, dim=-1)
    return x * cos.double() + torch.cat([-second, first], -1) * sin.double()


def _positions(kind: str, s: int, b: int) -> torch.Tensor:
    if kind == "offset":  # generation: positions continue after a cache
        return (torch.arange(s) + 1000).expand(b, s)
    if kind == "packed":  # packed samples restart their positions
        lengths = [max(1, s // 3), max(1, s // 2)]
        lengths.append(s - sum(lengths))
        row = torch.cat([torch.arange(n) for n in lengths if n > 0])[:s]
        return row.expand(b, s)
    return torch.arange(s).expand(b, s)


ROTARY_CASES = [
    # (s, b, heads, d, positions)
    (1, 1, 1, 2, "plain"),
    (7, 3, 5, 64, "offset"),
    (33, 2, 8, 128, "packed"),
    (19, 2, 3, 80, "plain"),  # d/2 = 40: not a multiple of the bf16 vector width
    (8192, 1, 4, 128, "packed"),
    (5, 2, 4, 6, "offset"),
]


@pytest.mark.parametrize("case", ROTARY_CASES, ids=_ids(ROTARY_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "qkv-view"])
def test_rotary(case, dtype, strided) -> None:
    s, b, heads, d, kind = case
    cos, sin = RotaryEmbedding(d, 10000.0).to(DEVICE)(_positions(kind, s, b).to(DEVICE))
    if strided:  # k as the model sees it: a view into the fused qkv output (gaps between rows)
        source = _randn(s, b, 3 * heads * d, dtype=dtype, seed=0)

        def view(t: torch.Tensor) -> torch.Tensor:
            return t[..., heads * d : 2 * heads * d].view(s, b, heads, d)
    else:
        source = _randn(s, b, heads, d, dtype=dtype, seed=0)

        def view(t: torch.Tensor) -> torch.Tensor:
            return t

    check(lambda t: fused.Rotary.apply(view(t), cos, sin), lambda t: reference.apply_rotary(view(t), cos, sin),
          lambda t: _truth_rotary(view(t), cos, sin), [source], [True])


def test_rotary_broadcast_tables() -> None:
    """cos/sin `[s, 1, 1, d]` shared by the batch give the same result as the expanded tables."""
    x = _randn(9, 3, 2, 16, dtype=torch.bfloat16, seed=0)
    cos, sin = RotaryEmbedding(16, 500.0).to(DEVICE)(torch.arange(9, device=DEVICE)[None])
    expanded = fused.Rotary.apply(x, cos.expand(9, 3, 1, 16).contiguous(), sin.expand(9, 3, 1, 16).contiguous())
    assert torch.equal(fused.Rotary.apply(x, cos, sin), expanded)


# --- activations ------------------------------------------------------------------------------

ACT_SHAPES = [(1, 2), (3, 14), (17, 2 * 1000), (9, 2 * 1001), (256, 2 * 5504), (4, 8, 2 * 14336)]


@pytest.mark.parametrize("shape", ACT_SHAPES, ids=_ids(ACT_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_swiglu(shape, dtype) -> None:
    x = _randn(*shape, dtype=dtype, seed=0, scale=2.0)

    def truth(x):
        gate, up = x.chunk(2, -1)
        return F.silu(gate) * up

    check(fused.SwiGLU.apply, reference.swiglu, truth, [x], [True])


BIAS_ACT_SHAPES = [(1, 1), (3, 7), (17, 1000), (9, 1001), (256, 4096), (2, 64, 11008)]


@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("shape", BIAS_ACT_SHAPES, ids=_ids(BIAS_ACT_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_bias_activations(kind, with_bias, shape, dtype) -> None:
    x = _randn(*shape, dtype=dtype, seed=0, scale=3.0)
    bias = _randn(shape[-1], dtype=dtype, seed=1) if with_bias else None
    ref = {
        "gelu": reference.gelu,
        "gelu_tanh": lambda x, b=None: reference.gelu(x, b, "tanh"),
        "quick_gelu": reference.quick_gelu,
    }[kind]

    def truth(x, b=None):
        z = x if b is None else x + b
        if kind == "quick_gelu":
            return z * torch.sigmoid(1.702 * z)
        return F.gelu(z, approximate="tanh" if kind == "gelu_tanh" else "none")

    if with_bias:
        check(lambda x, b: fused.BiasActivation.apply(x, b, kind), ref, truth, [x, bias], [True, True])
    else:
        check(lambda x: fused.BiasActivation.apply(x, None, kind), ref, truth, [x], [True])


# --- scaled masked softmax --------------------------------------------------------------------

SOFTMAX_CASES = [
    # (b, heads, s_q, s_k, mask kind, causal)
    (1, 1, 1, 1, "none", False),
    (2, 3, 17, 17, "none", True),
    (2, 4, 128, 128, "keys", False),
    (1, 2, 5, 9, "none", True),  # fewer queries than keys: causality aligned to the last query
    (2, 2, 33, 33, "block", True),  # packed samples: block-causal mask
    (1, 2, 64, 8192, "keys", False),
    (3, 1, 7, 1001, "full", False),
    (1, 1, 4, 6, "empty-row", False),  # a query with no allowed key: zeros
]


def _softmax_mask(kind: str, b: int, s_q: int, s_k: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "keys":  # key padding [b, 1, 1, s_k]
        mask = torch.ones(b, 1, 1, s_k, dtype=torch.bool)
        mask[-1, ..., s_k * 3 // 4 :] = False
    elif kind == "block":
        ids = torch.arange(s_k) * 3 // s_k
        mask = (ids[:, None] == ids[None, :])[None, None].expand(b, 1, s_q, s_k)
    elif kind == "full":
        mask = torch.rand(b, 1, s_q, s_k, generator=torch.Generator().manual_seed(0)) > 0.5
        mask[..., 0] = True
    else:
        mask = torch.ones(b, 1, s_q, s_k, dtype=torch.bool)
        mask[0, 0, 1] = False
    return mask.to(DEVICE)


def _truth_softmax(scores, mask, scale, causal):
    allowed = reference.allowed_keys(mask, causal, scores.shape[-2], scores.shape[-1], scores.device)
    x = scores * scale
    if allowed is None:
        return torch.softmax(x, -1)
    probs = torch.softmax(x.masked_fill(~allowed, float("-inf")), -1)
    return probs.masked_fill(~allowed.any(-1, keepdim=True), 0.0)


@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=_ids(SOFTMAX_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_scaled_masked_softmax(case, dtype) -> None:
    b, heads, s_q, s_k, kind, causal = case
    scores = _randn(b, heads, s_q, s_k, dtype=dtype, seed=0, scale=4.0)
    mask = _softmax_mask(kind, b, s_q, s_k)
    scale = 1 / math.sqrt(64)
    check(
        lambda s: fused.ScaledMaskedSoftmax.apply(s, mask, scale, causal),
        lambda s: reference.scaled_masked_softmax(s, mask, scale, causal),
        lambda s: _truth_softmax(s, mask, scale, causal),
        [scores], [True],
    )


# --- cross entropy ----------------------------------------------------------------------------

CE_CASES = [(1, 7, 7), (37, 1000, 997), (256, 32000, 32000), (64, 32064, 32000), (16, 128256, 128256), (5, 3, 1)]


@pytest.mark.parametrize("case", CE_CASES, ids=_ids(CE_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_cross_entropy(case, dtype) -> None:
    rows, padded, vocab = case
    logits = _randn(rows, 2, padded, dtype=dtype, seed=0, scale=3.0)
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, vocab, (rows, 2), generator=g)
    target[0, 1] = reference.IGNORE_INDEX
    target = target.to(DEVICE)

    def truth(x):
        flat = x[..., :vocab].reshape(-1, vocab)
        loss = F.cross_entropy(flat, target.reshape(-1), reduction="none", ignore_index=reference.IGNORE_INDEX)
        return loss.view(target.shape)

    check(lambda x: fused.VocabParallelCrossEntropy.apply(x, target, vocab, None),
          lambda x: reference.vocab_parallel_cross_entropy(x, target, vocab, None), truth, [logits], [True])


def test_cross_entropy_keeps_no_fp32_copy_of_the_logits() -> None:
    """Peak memory of forward + backward: the logits, their gradient and per-token vectors only."""
    logits = _randn(2048, 32000, dtype=torch.bfloat16, seed=0).requires_grad_()
    target = torch.randint(0, 32000, (2048,), device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused.VocabParallelCrossEntropy.apply(logits, target, 32000, None).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    fp32_copy = logits.numel() * 4
    assert extra < fp32_copy, f"{extra} bytes beyond the inputs: an fp32 copy would be {fp32_copy}"


# --- dispatch reaches the kernels, and a model runs on them ------------------------------------


def test_dispatcher_uses_the_kernels_on_cuda() -> None:
    x = _randn(4, 96, dtype=torch.bfloat16, seed=0)
    w = _randn(96, dtype=torch.bfloat16, seed=1)
    assert torch.equal(kernels.rms_norm(x, w, 1e-6), fused.RMSNorm.apply(x, w, 1e-6))
    assert torch.equal(kernels.swiglu(x), fused.SwiGLU.apply(x))
    with kernels.kernel_mode("reference"):
        assert torch.equal(kernels.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    fp64 = x.double()
    assert torch.equal(kernels.swiglu(fp64), reference.swiglu(fp64))  # unsupported dtype: reference


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_llava_loss_and_grads_with_all_kernels(backend: str) -> None:
    """A tiny LLaVA (layernorm/quick-GELU tower, rmsnorm/rope/swiglu decoder) in fp32 on the GPU:
    the loss and grads with every kernel equal the reference run's."""
    from dataclasses import replace

    from megamm.models.llava import LlavaModel
    from megamm.parallel.state import ParallelState
    from tests.tiny import llava_config, make_batch

    config = llava_config()
    config = replace(config, language=replace(
        config.language, transformer=replace(config.language.transformer, attention_backend=backend)
    ))
    batch = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in make_batch(config, [1, 1]).items()}
    results = []
    for mode in ("reference", "all"):
        with kernels.kernel_mode(mode):
            model = LlavaModel(config, ParallelState.single(DEVICE))
            model.initialize(0)
            loss = model(**batch)["loss"].sum()
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
