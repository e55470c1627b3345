"""The kernel dispatcher and the extension loader, without a GPU: modes and the MEGAMM_KERNELS
variable, the table of verified kernels, fallbacks, and the messages when the kernels cannot be built."""

from __future__ import annotations

import re
import shutil
import warnings

import pytest
import torch

from megamm import kernels
from megamm.kernels import build, dispatch, ops, reference
from megamm.kernels.build import KernelBuildError


@pytest.fixture(autouse=True)
def clean_state(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_override", None)
    build.reset()
    yield
    build.reset()


def test_modes() -> None:
    assert dispatch.parse_mode(None).names == frozenset(dispatch.VERIFIED)
    assert dispatch.parse_mode("auto") == dispatch.parse_mode("")
    assert dispatch.parse_mode("reference").names == frozenset()
    assert dispatch.parse_mode("off").explicit
    assert dispatch.parse_mode("ALL").names == frozenset(dispatch.KERNELS)
    mode = dispatch.parse_mode("rms_norm, rotary")
    assert mode.names == frozenset({"rms_norm", "rotary"}) | frozenset(dispatch.VERIFIED) and mode.explicit
    with pytest.raises(ValueError, match=r"MEGAMM_KERNELS='rms_norm,flash'.*unknown kernel\(s\) flash"):
        dispatch.parse_mode("rms_norm,flash")
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.set_mode("everything")


def test_environment_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not dispatch.enabled("swiglu")
    monkeypatch.setenv(dispatch.ENV_VAR, "swiglu")
    assert dispatch.enabled("swiglu") and not dispatch.enabled("softmax")
    with kernels.kernel_mode("reference"):
        assert not dispatch.enabled("swiglu")
        with kernels.kernel_mode("all"):
            assert dispatch.enabled("softmax")
        assert not dispatch.enabled("softmax")
    assert dispatch.enabled("swiglu")
    with pytest.raises(KeyError):
        dispatch.enabled("flash_attention")


def test_verified_table_is_well_formed_and_turns_kernels_on_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, entry in dispatch.VERIFIED.items():
        assert name in dispatch.KERNELS and entry.device
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", entry.date), entry
    unverified = [name for name in dispatch.KERNELS if name not in dispatch.VERIFIED]
    for name in unverified:
        assert not dispatch.enabled(name), f"{name} is enabled by default without a GPU verification"
    if unverified:
        name = unverified[0]
        entry = dispatch.Verification("NVIDIA H100 80GB HBM3, torch 2.11.0+cu130", "2026-01-01")
        monkeypatch.setitem(dispatch.VERIFIED, name, entry)
        assert dispatch.enabled(name)
        with kernels.kernel_mode("reference"):
            assert not dispatch.enabled(name)


def test_unsupported_inputs_never_load_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden():
        raise AssertionError("the extension must not be loaded for CPU tensors")

    monkeypatch.setattr(ops, "load_extension", forbidden)
    x = torch.randn(3, 8, dtype=torch.float64)
    with kernels.kernel_mode("all"):
        assert torch.equal(kernels.rms_norm(x, torch.ones(8, dtype=torch.float64), 1e-6),
                           reference.rms_norm(x, torch.ones(8, dtype=torch.float64), 1e-6))
        assert torch.equal(kernels.quick_gelu(x.float()), reference.quick_gelu(x.float()))
        scores = torch.randn(1, 2, 3, 3)
        assert torch.equal(kernels.scaled_masked_softmax(scores, None, 1.0, True),
                           reference.scaled_masked_softmax(scores, None, 1.0, True))


def _failing_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail():
        raise KernelBuildError("no toolchain here")

    monkeypatch.setattr(ops, "load_extension", fail)
    monkeypatch.setattr(ops, "_warned", False)


def test_build_failure_raises_when_kernels_were_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_build(monkeypatch)
    with kernels.kernel_mode("rms_norm"), pytest.raises(KernelBuildError, match="no toolchain"):
        ops._use_kernel("rms_norm", lambda: True)


def test_build_failure_falls_back_with_one_warning_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_build(monkeypatch)
    monkeypatch.setitem(dispatch.VERIFIED, "rms_norm", dispatch.Verification("test GPU", "2026-01-01"))
    with pytest.warns(RuntimeWarning, match=r"(?s)no toolchain.*Using the torch references"):
        assert not ops._use_kernel("rms_norm", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback is silent
        assert not ops._use_kernel("rms_norm", lambda: True)


def test_unsupported_inputs_skip_the_kernel_before_any_build(monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_build(monkeypatch)
    with kernels.kernel_mode("all"):
        assert not ops._use_kernel("rms_norm", lambda: False)


def test_load_extension_explains_why_it_cannot_build_here() -> None:
    if torch.version.cuda is not None and torch.cuda.is_available():
        pytest.skip("this machine can build the kernels")
    with pytest.raises(KernelBuildError) as error:
        build.load_extension()
    message = str(error.value)
    assert "megamm._kernels_cuda" in message and "MEGAMM_BUILD_CUDA=1" in message
    assert "MEGAMM_KERNELS=reference" in message
    assert build.jit_problem() in message
    with pytest.raises(KernelBuildError) as again:  # cached: the same error, no second attempt
        build.load_extension()
    assert again.value is error.value


def test_build_tag_follows_the_sources(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    csrc = tmp_path / "csrc"
    shutil.copytree(build.CSRC, csrc)
    monkeypatch.setattr(build, "CSRC", csrc)
    assert build.sources()[0].name == "kernels_torch.cpp"
    assert {p.suffix for p in build.sources()[1:]} == {".cu"}
    tag = build.build_tag()
    (csrc / "norm.cu").write_text((csrc / "norm.cu").read_text() + "\n// changed\n")
    assert build.build_tag() != tag
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    assert build.cache_dir() == tmp_path / "cache"
