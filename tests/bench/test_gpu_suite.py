"""bench/gpu_suite.py --dry-run: every configuration the GPU run would train validates on the CPU,
and a configuration that does not is reported by mode, with the config's own problem."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_dry_run_validates_every_mode(gpu_suite, capsys) -> None:
    assert gpu_suite.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for mode in gpu_suite.MODES:
        assert f"ok  {mode.name}: 1.0" in out, out  # about 1B parameters
        assert f"MEGAMM_KERNELS={mode.kernels} " in out
    assert out.count("--torch-compile") == 2 and "validate" in out.splitlines()[-1]


def test_dry_run_reports_a_configuration_that_does_not_validate(gpu_suite, capsys, tmp_path: Path) -> None:
    config = tmp_path / "dropout.yaml"
    text = (ROOT / "bench" / "llava_1b.yaml").read_text()
    config.write_text(text.replace("      ffn_hidden_size: 5632\n", "      ffn_hidden_size: 5632\n      hidden_dropout: 0.1\n"))
    assert gpu_suite.main(["--dry-run", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "gpu_suite --dry-run: 2 problem(s)" in out, out
    assert out.count("--torch-compile needs model.language.transformer.hidden_dropout = 0") == 2
    assert "ok  kernels off, compile off" in out and "ok  kernels on, compile off" in out


def test_log_line_parsing(gpu_suite, tmp_path: Path) -> None:
    log = tmp_path / "training.log"
    log.write_text(
        " torch.compile: the first step took 41.3 s, graph compilation included; it is not counted in tokens/s\n"
        " iteration        8/8 | consumed samples:         32 | elapsed time per iteration (ms): 210.5 | "
        "learning rate: 1.000E-05 | lm loss: 1.037E+01 | grad norm: 3.210 | skipped iterations: 0 | "
        "tokens/s: 38917 | TFLOP/s/device: 233.112 | MFU: 23.6% | peak memory (GiB): 41.20\n"
    )
    assert gpu_suite._training_figures(log) == {
        "iteration": 8, "ms_per_iteration": 210.5, "tokens_per_s": 38917.0, "tflops_per_device": 233.112,
        "mfu": "23.6%", "loss": "1.037E+01", "peak_memory_gib": 41.2, "first_step_s_compile_included": 41.3,
    }
