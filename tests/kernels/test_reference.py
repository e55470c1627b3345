"""The torch references of megamm.kernels: equal to the model's previous formulas bit for bit, the
model calls every op through megamm.kernels, and the unfused attention path equals sdpa."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megamm import kernels
from megamm.kernels import reference
from megamm.models.llava import LlavaModel
from megamm.parallel.params import initialize_parameters
from megamm.parallel.state import ParallelState
from megamm.transformer import mlp
from megamm.transformer.attention import SelfAttention
from tests.tiny import language_config, llava_config, make_batch, vision_config

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# The model's formulas before they moved to megamm.kernels.reference, copied verbatim.
def previous_rms_norm(x, weight, eps):
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def previous_layer_norm(x, weight, bias, eps):
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


def previous_rotary(x, cos, sin):
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat([-second, first], dim=-1) * sin).to(x.dtype)


def previous_swiglu(hidden):
    gate, up = hidden.chunk(2, dim=-1)
    return F.silu(gate) * up


def previous_quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _values_and_grads(fn, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """fn's output and the grads of every input, for one fixed upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves if leaf.requires_grad]


def _assert_identical(fn_a, fn_b, *inputs: torch.Tensor) -> None:
    for a, b in zip(_values_and_grads(fn_a, *inputs), _values_and_grads(fn_b, *inputs), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_references_equal_previous_model_math(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 37, generator=g).to(dtype)
    w, b = (torch.randn(37, generator=g).to(dtype) for _ in range(2))
    _assert_identical(lambda x, w: reference.rms_norm(x, w, 1e-5), lambda x, w: previous_rms_norm(x, w, 1e-5), x, w)
    _assert_identical(
        lambda x, w, b: reference.layer_norm(x, w, b, 1e-6), lambda x, w, b: previous_layer_norm(x, w, b, 1e-6), x, w, b
    )
    q = torch.randn(5, 3, 4, 10, generator=g).to(dtype)
    angles = torch.randn(5, 3, 1, 5, generator=g)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    _assert_identical(lambda q: reference.apply_rotary(q, cos, sin), lambda q: previous_rotary(q, cos, sin), q)
    hidden = torch.randn(5, 3, 22, generator=g).to(dtype)
    _assert_identical(reference.swiglu, previous_swiglu, hidden)
    _assert_identical(reference.quick_gelu, previous_quick_gelu, hidden)
    _assert_identical(reference.gelu, F.gelu, hidden)
    _assert_identical(lambda h: reference.gelu(h, approximate="tanh"), lambda h: F.gelu(h, approximate="tanh"), hidden)
    bias = torch.randn(22, generator=g).to(dtype)
    _assert_identical(lambda h, c: reference.quick_gelu(h, c), lambda h, c: previous_quick_gelu(h + c), hidden, bias)
    _assert_identical(lambda h, c: reference.gelu(h, c), lambda h, c: F.gelu(h + c), hidden, bias)


def test_ops_on_cpu_are_the_references_even_with_kernels_forced() -> None:
    """CPU tensors never reach a kernel: with every kernel enabled the ops still equal the references."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 16, generator=g), torch.randn(16, generator=g)
    with kernels.kernel_mode("all"):
        assert torch.equal(kernels.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
        assert torch.equal(kernels.swiglu(x), reference.swiglu(x))
        assert torch.equal(kernels.gelu_tanh(x, w), reference.gelu(x, w, "tanh"))
        logits, target = torch.randn(6, 16, generator=g), torch.tensor([1, 2, -100, 13, 0, 3])
        assert torch.equal(
            kernels.vocab_parallel_cross_entropy(logits, target, 14, None),
            reference.vocab_parallel_cross_entropy(logits, target, 14, None),
        )
    with pytest.raises(ValueError, match="approximate"):
        kernels.gelu(x, approximate="sigmoid")


def test_softmax_reference_masks_causality_and_empty_rows() -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 3, 4, 6, generator=g)
    mask = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    mask[1, 0, 2] = False  # a query with no key at all
    mask[0, 0, :, 5] = False  # a padded key
    probs = reference.scaled_masked_softmax(scores, mask, 0.5, causal=True)
    # Causality aligned to the last query: query i sees keys 0 .. i + 2.
    allowed = torch.ones(4, 6, dtype=torch.bool).tril(2) & mask
    expected = torch.softmax((0.5 * scores).masked_fill(~allowed, float("-inf")), -1)
    expected = torch.nan_to_num(expected, nan=0.0)
    torch.testing.assert_close(probs, expected, rtol=0, atol=0)
    assert torch.equal(probs[1, :, 2], torch.zeros(3, 6))
    torch.testing.assert_close(probs.sum(-1)[0], torch.ones(3, 4))
    plain = reference.scaled_masked_softmax(scores.bfloat16(), None, 1.0, causal=False)
    assert plain.dtype == torch.bfloat16
    torch.testing.assert_close(plain, torch.softmax(scores.bfloat16().float(), -1).bfloat16(), rtol=0, atol=0)


def _attention_pair(**overrides) -> tuple[SelfAttention, SelfAttention]:
    config = replace(language_config().transformer, **overrides)
    sdpa = SelfAttention(config, ParallelState.single(), sequence_parallel=False)
    unfused = SelfAttention(replace(config, attention_backend="unfused"), ParallelState.single(), False)
    initialize_parameters(sdpa, 3, None)
    unfused.load_state_dict(sdpa.state_dict())
    return sdpa, unfused


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_unfused_attention_equals_sdpa(causal: bool, masked: bool) -> None:
    """Same outputs and grads, with GQA (8 heads, 4 groups), key padding and causality."""
    sdpa, unfused = _attention_pair(causal=causal)
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 8, 7, 8, generator=g), torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, 4, 7, 8, generator=g)
    mask = None
    if masked:
        mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
        mask[1, ..., 5:] = False
    results = []
    for module in (sdpa, unfused):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = module._core(*leaves, mask)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        results.append([out.detach()] + [leaf.grad for leaf in leaves])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_unfused_attention_aligns_causality_like_sdpa_for_fewer_queries() -> None:
    sdpa, unfused = _attention_pair(causal=True)
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 8, 3, 8, generator=g), torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 4, 6, 8, generator=g)
    torch.testing.assert_close(unfused._core(q, k, v, None), sdpa._core(q, k, v, None), rtol=1e-5, atol=1e-6)
    mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    torch.testing.assert_close(unfused._core(q, k, v, mask), sdpa._core(q, k, v, mask), rtol=1e-5, atol=1e-6)


def test_unfused_attention_backend_in_a_whole_model() -> None:
    """The language model's loss and grads with attention_backend="unfused" equal sdpa's."""
    def run(backend: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        config = llava_config()
        config = replace(config, language=replace(
            config.language, transformer=replace(config.language.transformer, attention_backend=backend)
        ))
        model = LlavaModel(config, ParallelState.single())
        model.initialize(0)
        loss = model(**make_batch(config, [1, 0]))["loss"].sum()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = run("sdpa")
    loss_unfused, grads_unfused = run("unfused")
    torch.testing.assert_close(loss_unfused, loss, rtol=1e-6, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_unfused[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_model_calls_every_op_through_megamm_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LLaVA forward (layernorm + quick-GELU tower, rmsnorm + rope + swiglu decoder, cross entropy)
    goes through the dispatching ops, so enabling a kernel reaches the model."""
    calls: dict[str, int] = {}
    original_ops = {name: getattr(kernels, name) for name in ("gelu", "gelu_tanh", "quick_gelu")}
    names = ["rms_norm", "layer_norm", "apply_rotary", "swiglu", "quick_gelu", "vocab_parallel_cross_entropy"]
    for name in names:
        original = getattr(kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    # The MLP looks its elementwise activation up in a table filled at import with the ops themselves.
    assert mlp.ELEMENTWISE_ACTIVATIONS == {
        "gelu": original_ops["gelu"], "gelu_tanh": original_ops["gelu_tanh"], "quick_gelu": original_ops["quick_gelu"]
    }
    monkeypatch.setitem(mlp.ELEMENTWISE_ACTIVATIONS, "quick_gelu", kernels.quick_gelu)
    config = llava_config(vision=vision_config())
    model = LlavaModel(config, ParallelState.single())
    model.initialize(0)
    model(**make_batch(config, [1, 1]))
    assert set(calls) == set(names), calls
