"""The prepared GPU run: build the CUDA kernels, run tests/gpu, bench/kernels.py and a bf16 training
step of a ~1B-parameter LLaVA with the kernels off/on and torch.compile off/on, into one results file.

Stages, in order, each under its own time limit and all under `--budget` seconds (a stage that runs
out of time is recorded as timed out and the next one starts; the results file is rewritten after
every stage, so an interrupted run keeps what it measured):

1. `build`: the kernels' extension (`megamm.kernels.build.load_extension`: the ahead-of-time module,
   else the just-in-time build into MEGAMM_KERNELS_CACHE), and its build time;
2. `tests_gpu`: `pytest tests/gpu` (every fused kernel against its torch reference), each test's
   outcome from the JUnit report;
3. `kernels`: `bench/kernels.py --dtypes bf16` (its rows, from its --json file);
4. `training`: `megamm.train` on one GPU with `bench/llava_1b.yaml --bf16`, for each mode of
   `MODES`; from its log line at the last iteration (which times the steady steps only, see the
   config's log_interval): ms per iteration, tokens/s, TFLOP/s and MFU as the training log computes
   them (`megamm.training.metrics.step_flops`, the vision tower and projector counted), the loss and
   peak memory; with --torch-compile also the first step's time (compilation included).

`--dry-run` runs on the CPU and touches no GPU: it parses and resolves every training configuration
the suite would run (the YAML with every flag combination, and each MEGAMM_KERNELS value), counts the
model's parameters on the meta device and its FLOPs per step, checks bench/kernels.py's arguments and
that the test directory exists, and prints what the real run would execute. Exit status 0 when
everything validates, 1 with every problem listed.

    bash bench/gpu_suite.sh --out results/            # on one H100/H200, about 8 minutes
    bash bench/gpu_suite.sh --dry-run                 # anywhere
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "bench" / "llava_1b.yaml"
RESULTS = "gpu_suite.json"


@dataclass(frozen=True)
class Mode:
    """One training run: the MEGAMM_KERNELS value and whether --torch-compile is on."""

    kernels: str  # "reference" (off) or "all" (on)
    torch_compile: bool

    @property
    def name(self) -> str:
        return f"kernels {'on' if self.kernels == 'all' else 'off'}, compile {'on' if self.torch_compile else 'off'}"

    def flags(self, config: Path) -> list[str]:
        return ["--config", str(config), "--bf16", *(["--torch-compile"] if self.torch_compile else [])]


MODES = tuple(Mode(kernels, compiled) for compiled in (False, True) for kernels in ("reference", "all"))
# Seconds per stage (each also bounded by what is left of --budget); 4 training runs of about 1.5 min.
LIMITS = {"build": 150, "tests_gpu": 120, "kernels": 60, "training": 110}
KERNEL_BENCH_ARGS = ["--dtypes", "bf16", "--repeats", "10"]

LOG_LINE = re.compile(
    r"iteration\s+(?P<iteration>\d+)/\d+ .*elapsed time per iteration \(ms\): (?P<ms>[\d.]+) .*"
    r"lm loss: (?P<loss>\S+) .*tokens/s: (?P<tokens>[\d.]+) \| TFLOP/s/device: (?P<tflops>[\d.]+) \| "
    r"MFU: (?P<mfu>\S+) \| peak memory \(GiB\): (?P<memory>[\d.]+)"
)
FIRST_STEP = re.compile(r"torch\.compile: the first step took (?P<seconds>[\d.]+) s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help=f"directory for {RESULTS} and the logs (required without --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="validate every configuration on the CPU and exit")
    parser.add_argument("--config", type=Path, default=CONFIG, help=f"training config (default: {CONFIG.relative_to(ROOT)})")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole suite (default: 480)")
    args = parser.parse_args(argv)
    if not args.dry_run and args.out is None:
        parser.error("--out is required (or --dry-run)")
    return args


def training_command(mode: Mode, config: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            "-m", "megamm.train", *mode.flags(config)]


# ---- dry run ------------------------------------------------------------------------------------


def dry_run(config: Path) -> int:
    """Validate every configuration without a GPU; print what the suite would run."""
    from megamm.config.model import ConfigError
    from megamm.config.parsing import parse_run_config
    from megamm.config.resolved import resolve
    from megamm.kernels.dispatch import parse_mode
    from megamm.models.llava import LlavaModel
    from megamm.parallel.state import ParallelState
    from megamm.training.metrics import step_flops

    problems: list[str] = []
    for mode in MODES:
        try:
            parse_mode(mode.kernels)
            resolved = resolve(parse_run_config(mode.flags(config), world_size=1), world_size=1)
        except (ConfigError, ValueError) as error:
            problems.append(f"{mode.name} (MEGAMM_KERNELS={mode.kernels} {' '.join(mode.flags(config))}): {error}")
            continue
        t = resolved.training
        model = LlavaModel(resolved.model, ParallelState.single("meta"))
        params = sum(p.numel() for p in model.parameters())
        images = t.micro_batch_size * t.images_per_sample
        flops = step_flops(resolved.model, t.seq_length, t.micro_batch_size, images)
        print(f"ok  {mode.name}: {params / 1e9:.3f}B parameters, {t.micro_batch_size} x {t.seq_length} tokens, "
              f"up to {images} image(s), {flops / 1e12:.1f} TFLOPs per step at most; "
              f"MEGAMM_KERNELS={mode.kernels} {' '.join(training_command(mode, config)[1:])}")
    problems += _kernel_bench_problems()
    if not (ROOT / "tests" / "gpu").is_dir():
        problems.append("tests/gpu: no such directory")
    if problems:
        print(f"gpu_suite --dry-run: {len(problems)} problem(s):\n" + "\n".join(f"- {p}" for p in problems))
        return 1
    print(f"gpu_suite --dry-run: {len(MODES)} training configurations, the kernel benchmark's arguments and "
          "tests/gpu validate")
    return 0


def _kernel_bench_problems() -> list[str]:
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    try:
        module.parse_args([*KERNEL_BENCH_ARGS, "--json", os.devnull])
    except SystemExit:
        return [f"bench/kernels.py refuses the suite's arguments {' '.join(KERNEL_BENCH_ARGS)}"]
    return []


# ---- the run ------------------------------------------------------------------------------------


class Suite:
    """Runs the stages and keeps the results file current."""

    def __init__(self, out: Path, budget: float) -> None:
        self.out = out
        self.deadline = time.monotonic() + budget
        self.results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "stages": {}}

    def write(self) -> None:
        (self.out / RESULTS).write_text(json.dumps(self.results, indent=2) + "\n")

    def run(self, name: str, command: list[str], limit: float, env: dict[str, str] | None = None) -> dict:
        """Run one command with its output in `<out>/<name>.log`; its status, seconds and exit code."""
        left = self.deadline - time.monotonic()
        record: dict = {"command": " ".join(command), "log": f"{name}.log"}
        if left < 10:
            record["status"] = "skipped: the suite's --budget is spent"
            return record
        start = time.monotonic()
        with open(self.out / f"{name}.log", "w") as log:
            try:
                done = subprocess.run(command, check=False, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})}, timeout=min(limit, left))
                record["status"] = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
            except subprocess.TimeoutExpired:
                record["status"] = f"timed out after {min(limit, left):.0f} s"
        record["seconds"] = round(time.monotonic() - start, 1)
        return record

    def stage(self, name: str, record: dict) -> None:
        self.results["stages"][name] = record
        self.write()


def _junit_outcomes(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    outcomes = {}
    for case in ElementTree.parse(path).iter("testcase"):
        kinds = [child.tag for child in case]
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return outcomes


def _training_figures(log: Path) -> dict:
    text = log.read_text() if log.exists() else ""
    lines = [m.groupdict() for m in LOG_LINE.finditer(text)]
    figures: dict = {}
    if lines:
        last = lines[-1]
        figures = {"iteration": int(last["iteration"]), "ms_per_iteration": float(last["ms"]),
                   "tokens_per_s": float(last["tokens"]), "tflops_per_device": float(last["tflops"]),
                   "mfu": last["mfu"], "loss": last["loss"], "peak_memory_gib": float(last["memory"])}
    first = FIRST_STEP.search(text)
    if first:
        figures["first_step_s_compile_included"] = float(first["seconds"])
    return figures


def run_suite(out: Path, config: Path, budget: float) -> int:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    suite = Suite(out, budget)
    suite.results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    suite.results["torch"] = torch.__version__
    suite.write()
    python = sys.executable
    build = "from megamm.kernels.build import load_extension; print(load_extension().__file__)"
    suite.stage("build", suite.run("build", [python, "-c", build], LIMITS["build"]))
    junit = out / "tests_gpu.xml"
    record = suite.run("tests_gpu", [python, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider",
                                     f"--junitxml={junit}"], LIMITS["tests_gpu"])
    record["tests"] = _junit_outcomes(junit)
    suite.stage("tests_gpu", record)
    rows = out / "kernels.json"
    record = suite.run("kernels", [python, "bench/kernels.py", *KERNEL_BENCH_ARGS, "--json", str(rows)],
                       LIMITS["kernels"])
    if rows.exists():
        record["results"] = json.loads(rows.read_text())
    suite.stage("kernels", record)
    runs = []
    for index, mode in enumerate(MODES):
        name = f"training_{index}"
        record = suite.run(name, training_command(mode, config), LIMITS["training"],
                           env={"MEGAMM_KERNELS": mode.kernels})
        record.update(mode=mode.name, kernels=mode.kernels, torch_compile=mode.torch_compile,
                      **_training_figures(out / f"{name}.log"))
        runs.append(record)
        suite.stage("training", runs)
    print(json.dumps(suite.results, indent=2))
    failed = [name for name, record in suite.results["stages"].items()
              if any(r.get("status") != "passed" for r in (record if isinstance(record, list) else [record]))]
    print(f"gpu_suite: results in {out / RESULTS}" + (f"; not passed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args.config)
    return run_suite(args.out, args.config, args.budget)


if __name__ == "__main__":
    sys.exit(main())
