"""Each fused kernel against its torch reference, eager and under torch.compile, on one GPU.

For every op, shape and dtype it reports the time of the forward and of forward + backward (median
of CUDA-event-timed repetitions), the memory bandwidth that time implies for the op's minimal
traffic (every input read once, every output written once; for example RMSNorm's forward moves
2 x numel x element size), that bandwidth as a share of the device's measured peak copy bandwidth
(a large device-to-device `copy_`, which reads and writes), and the kernel's speedup over both
references. Memory-bound kernels should reach most of the copy bandwidth on large shapes.

Run from the repository root on a CUDA machine (the kernels are built just in time on first use if
they were not built by pip):

    python bench/kernels.py                       # all ops, bf16
    python bench/kernels.py --ops rms_norm swiglu --dtypes bf16 fp32 --json results.json
    python bench/kernels.py --no-compile          # skip the torch.compile reference
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from megamm.config.precision import DTYPES
from megamm.kernels import fused, reference
from megamm.transformer.rope import RotaryEmbedding

SOFTMAX_SCALE = 0.125  # 1/sqrt(head_dim 64)


@dataclass
class Case:
    """One op on one shape: callables over `inputs`, and the bytes a minimal implementation moves."""

    op: str
    shape: str
    inputs: list[torch.Tensor]
    kernel: Callable
    reference: Callable
    forward_bytes: int
    backward_bytes: int


def _randn(shape, dtype, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, device="cuda") * scale).to(dtype)


def cases(op: str, dtype: torch.dtype) -> list[Case]:
    size = torch.tensor([], dtype=dtype).element_size()
    out: list[Case] = []
    if op in ("rms_norm", "layer_norm"):
        for rows, hidden in [(8192, 1024), (16384, 4096), (4096, 8192), (2048, 16384), (8192, 5120)]:
            x = _randn((rows, hidden), dtype)
            w, b = _randn((hidden,), dtype), _randn((hidden,), dtype)
            n = rows * hidden * size
            if op == "rms_norm":
                out.append(Case(op, f"{rows}x{hidden}", [x, w], lambda x, w: fused.RMSNorm.apply(x, w, 1e-5),
                                lambda x, w: reference.rms_norm(x, w, 1e-5), 2 * n, 3 * n))
            else:
                out.append(Case(op, f"{rows}x{hidden}", [x, w, b],
                                lambda x, w, b: fused.LayerNorm.apply(x, w, b, 1e-5),
                                lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), 2 * n, 3 * n))
    elif op == "rotary":
        for s, b, heads, d in [(4096, 2, 32, 128), (8192, 1, 8, 128), (2048, 4, 16, 64)]:
            x = _randn((s, b, heads, d), dtype)
            cos, sin = RotaryEmbedding(d, 10000.0).cuda()(torch.arange(s, device="cuda").expand(b, s))
            n = x.numel() * size + 2 * cos.numel() * 4
            out.append(Case(op, f"{s}x{b}x{heads}x{d}", [x], lambda x, c=cos, s_=sin: fused.Rotary.apply(x, c, s_),
                            lambda x, c=cos, s_=sin: reference.apply_rotary(x, c, s_), n + x.numel() * size,
                            n + x.numel() * size))
    elif op == "swiglu":
        for rows, f in [(8192, 5504), (16384, 11008), (4096, 14336)]:
            x = _randn((rows, 2 * f), dtype)
            m = rows * f * size
            out.append(Case(op, f"{rows}x2x{f}", [x], fused.SwiGLU.apply, reference.swiglu, 3 * m, 5 * m))
    elif op in ("gelu", "quick_gelu"):
        kind = op
        for rows, n_cols, with_bias in [(8192, 4096, True), (16384, 11008, False), (577 * 32, 4096, True)]:
            x = _randn((rows, n_cols), dtype)
            bias = _randn((n_cols,), dtype) if with_bias else None
            ref = reference.gelu if kind == "gelu" else reference.quick_gelu
            n = rows * n_cols * size
            inputs = [x, bias] if with_bias else [x]
            out.append(Case(op, f"{rows}x{n_cols}{'+bias' if with_bias else ''}", inputs,
                            lambda x, b=None, k=kind: fused.BiasActivation.apply(x, b, k), ref, 2 * n, 3 * n))
    elif op == "softmax":
        for b, heads, s in [(4, 32, 1024), (1, 16, 4096), (2, 16, 2048)]:
            x = _randn((b, heads, s, s), dtype, scale=4.0)
            n = x.numel() * size
            out.append(Case(op, f"{b}x{heads}x{s}x{s} causal", [x],
                            lambda x: fused.ScaledMaskedSoftmax.apply(x, None, SOFTMAX_SCALE, True),
                            lambda x: reference.scaled_masked_softmax(x, None, SOFTMAX_SCALE, True), 2 * n, 3 * n))
    elif op == "cross_entropy":
        for tokens, vocab in [(8192, 32000), (4096, 128256), (16384, 50304)]:
            x = _randn((tokens, vocab), dtype, scale=3.0)
            target = torch.randint(0, vocab, (tokens,), device="cuda")
            n = x.numel() * size
            out.append(Case(op, f"{tokens}x{vocab}", [x],
                            lambda x, t=target, v=vocab: fused.VocabParallelCrossEntropy.apply(x, t, v, None),
                            lambda x, t=target, v=vocab: reference.vocab_parallel_cross_entropy(x, t, v, None),
                            n, 2 * n))
    else:
        raise ValueError(f"unknown op {op!r}")
    return out


OPS = ("rms_norm", "layer_norm", "rotary", "swiglu", "gelu", "quick_gelu", "softmax", "cross_entropy")


def time_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` runs, after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_copy_bandwidth(repeats: int) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() / ms / 1e6


def forward_and_backward(fn: Callable, inputs: list[torch.Tensor]) -> tuple[Callable, Callable]:
    """Closures timing the forward alone and forward + backward (fixed upstream gradient)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with torch.no_grad():
        grad = torch.randn_like(fn(*inputs))

    def forward():
        with torch.no_grad():
            return fn(*inputs)

    def both():
        out = fn(*leaves)
        torch.autograd.backward(out, grad)
        for leaf in leaves:
            leaf.grad = None

    return forward, both


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    variant: str  # kernel, eager, compiled
    forward_ms: float
    forward_gbps: float
    total_ms: float
    total_gbps: float


def run(ops: list[str], dtypes: list[str], compile_reference: bool, repeats: int) -> tuple[float, list[Row]]:
    peak = peak_copy_bandwidth(repeats)
    rows: list[Row] = []
    for op in ops:
        for dtype_name in dtypes:
            for case in cases(op, DTYPES[dtype_name]):
                variants = {"kernel": case.kernel, "eager": case.reference}
                if compile_reference:
                    variants["compiled"] = torch.compile(case.reference, dynamic=False)
                for variant, fn in variants.items():
                    forward, both = forward_and_backward(fn, case.inputs)
                    f_ms, t_ms = time_ms(forward, repeats), time_ms(both, repeats)
                    total_bytes = case.forward_bytes + case.backward_bytes
                    rows.append(Row(op, case.shape, dtype_name, variant, f_ms, case.forward_bytes / f_ms / 1e6,
                                    t_ms, total_bytes / t_ms / 1e6))
                torch.cuda.empty_cache()
    return peak, rows


def report(peak: float, rows: list[Row]) -> str:
    lines = [
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}",
        f"peak copy bandwidth (measured): {peak:.0f} GB/s",
        "",
        (
            f"{'op':<14}{'shape':<26}{'dtype':<6}{'variant':<10}{'fwd ms':>9}{'GB/s':>8}{'%peak':>7}"
            f"{'fwd+bwd ms':>12}{'GB/s':>8}{'%peak':>7}{'speedup vs eager/compiled (fwd+bwd)':>38}"
        ),
    ]
    by_case: dict[tuple[str, str, str], dict[str, Row]] = {}
    for row in rows:
        by_case.setdefault((row.op, row.shape, row.dtype), {})[row.variant] = row
    for (op, shape, dtype), variants in by_case.items():
        for variant, row in variants.items():
            speedup = ""
            if variant == "kernel":
                parts = [f"{variants[v].total_ms / row.total_ms:.2f}x" for v in ("eager", "compiled") if v in variants]
                speedup = " / ".join(parts)
            lines.append(
                f"{op:<14}{shape:<26}{dtype:<6}{variant:<10}{row.forward_ms:>9.3f}{row.forward_gbps:>8.0f}"
                f"{100 * row.forward_gbps / peak:>6.0f}%{row.total_ms:>12.3f}{row.total_gbps:>8.0f}"
                f"{100 * row.total_gbps / peak:>6.0f}%{speedup:>38}"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per measurement (median)")
    parser.add_argument("--json", help="also write the rows and the peak bandwidth to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA device (the kernels are CUDA only)", file=sys.stderr)
        return 2
    peak, rows = run(args.ops, args.dtypes, not args.no_compile, args.repeats)
    print(report(peak, rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "peak_copy_gbps": peak, "rows": [asdict(r) for r in rows]}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
