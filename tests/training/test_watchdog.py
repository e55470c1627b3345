"""Hangs end with a diagnosis; stragglers are named in the log line (docs/reliability.md).

In-process: the phase record's busy time, fault parsing and matching, the spread line. In a
subprocess: the watchdog on its own (it ends the process). Under torchrun: a training job whose
rank stalls inside a step, one whose rank dies, and one with a slow rank.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megamm.config.parsing import parse_run_config
from megamm.parallel.phase import PhaseRecord
from megamm.training import faults
from megamm.training.stragglers import spread_text
from megamm.training.watchdog import EXIT_STALLED
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "tiny_cpu.yaml")
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_busy_time_leaves_out_the_waits_for_peers() -> None:
    clock = FakeClock()
    record = PhaseRecord(clock)
    record.begin("iteration 1", 1, "data loading")
    clock.now += 2.0
    record.enter("loss-token all-reduce", waiting=True)
    clock.now += 5.0
    record.enter("forward")
    clock.now += 1.0
    with record.waiting_on_peers("p2p receive"):
        clock.now += 7.0
    assert record.current.label == "forward" and not record.current.waiting
    clock.now += 0.5
    assert record.busy_seconds() == pytest.approx(3.5)
    assert record.current.describe() == "forward, iteration 1"


def test_every_phase_change_is_a_new_serial() -> None:
    record = PhaseRecord(FakeClock())
    serials = [record.current.serial]
    for label in ("a", "a", "b"):
        record.enter(label)
        serials.append(record.current.serial)
    with record.waiting_on_peers("c"):
        serials.append(record.current.serial)
    serials.append(record.current.serial)
    assert serials == sorted(set(serials))


def test_fault_spec_is_parsed() -> None:
    assert faults.parse_fault("stall:rank:1:iteration:3:phase:data-parallel gradient sync") == faults.Fault(
        "stall", 1, 3, "data-parallel gradient sync"
    )
    assert faults.parse_fault("slow:rank:0:seconds:0.5") == faults.Fault("slow", 0, None, "data loading", 0.5)


@pytest.mark.parametrize(("text", "problem"), [
    ("hang:rank:1", "unknown fault kind 'hang'"),
    ("stall:rank", "key:value pairs"),
    ("stall:iteration:2", "rank:R is required"),
    ("stall:rank:1:when:2", "unknown key(s) when"),
    ("slow:rank:1", "slow needs seconds:S"),
    ("stall:rank:one", "invalid literal"),
])
def test_bad_fault_specs_name_the_variable_and_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match="MEGAMM_FAULT_INJECT") as error:
        faults.parse_fault(text)
    assert problem in str(error.value)


def test_fault_strikes_only_its_rank_iteration_and_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[tuple[int | None, str]] = []
    record = PhaseRecord(FakeClock())
    monkeypatch.setattr(faults.Fault, "strike", lambda _: slept.append((record.current.iteration, record.current.label)))
    monkeypatch.setenv(faults.VARIABLE, "slow:rank:1:iteration:2:phase:forward:seconds:0.25")
    assert faults.install_from_environment(PhaseRecord(), 0) is not None  # another rank: no hook
    faults.install_from_environment(record, 1)
    for iteration in (1, 2, 3):
        record.begin(f"iteration {iteration}", iteration, "data loading")
        record.enter("forward of microbatch 0")
        record.enter("backward of microbatch 0")
    assert slept == [(2, "forward of microbatch 0")]


def test_no_variable_no_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faults.VARIABLE, raising=False)
    record = PhaseRecord()
    assert faults.install_from_environment(record, 0) is None and record.hooks == []


def test_spread_line_names_the_slowest_and_fastest_rank_past_the_threshold() -> None:
    assert spread_text([1.01, 1.5, 1.92, 1.1], 1.2) == "step time spread: max 1.92 s (rank 2) / min 1.01 s (rank 0)"
    assert spread_text([1.0, 1.15], 1.2) == ""
    assert spread_text([0.0, 0.3], 1.2).startswith("step time spread: max 0.30 s (rank 1)")


def test_timeout_and_threshold_are_validated_up_front() -> None:
    config = parse_run_config(["--config", EXAMPLE, "--distributed-timeout-minutes", "0.05"], 1)
    assert config.parallel.distributed_timeout_minutes == 0.05
    with pytest.raises(ValueError) as error:
        parse_run_config(["--config", EXAMPLE, "--distributed-timeout-minutes", "0", "--straggler-threshold", "0.9"], 1)
    assert "--distributed-timeout-minutes must be > 0 (fractions allowed), got 0.0" in str(error.value)
    assert "--straggler-threshold is a ratio of step times, must be >= 1, got 0.9" in str(error.value)


# ---- the watchdog in a process of its own ----------------------------------------------------------

WATCHED = textwrap.dedent("""
    import sys, time
    from megamm.parallel.phase import PhaseRecord
    from megamm.training.watchdog import Watchdog

    def stuck_in_the_test_collective():
        time.sleep(60)

    record = PhaseRecord()
    record.begin("iteration 7", 7, "data loading")
    with Watchdog(record, 1.0, 5, sys.argv[2], "--distributed-timeout-minutes 0.0167"):
        if sys.argv[1] == "stall":
            record.enter("test all-reduce (bucket 2)", waiting=True)
            print("entered", flush=True)
            stuck_in_the_test_collective()
        elif sys.argv[1] == "busy":
            for step in range(8):  # 2.4 s in all, no phase longer than 0.3 s
                record.enter(f"step {step}")
                time.sleep(0.3)
        elif sys.argv[1] == "error":
            record.enter("test all-reduce (bucket 2)", waiting=True)
            raise RuntimeError("Connection closed by peer")
        else:
            print("entered", flush=True)
            time.sleep(60)
""")


def _watched(mode: str, dump_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WATCHED, mode, str(dump_dir)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_watchdog_names_the_stalled_phase_dumps_every_stack_and_exits(tmp_path: Path) -> None:
    process = _watched("stall", tmp_path)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == EXIT_STALLED, stderr
    assert re.search(r"megamm: rank 5 stalled for 1\.\d s in: test all-reduce \(bucket 2\), iteration 7 "
                     r"\(limit 1 s, --distributed-timeout-minutes 0\.0167\)", stderr), stderr
    dumped = (tmp_path / "stacks-rank5.txt").read_text()
    for text in (stderr, dumped):
        assert "stuck_in_the_test_collective" in text and "in _watch" in text  # both threads


def test_watchdog_rearms_at_each_phase_and_leaves_no_file_behind(tmp_path: Path) -> None:
    process = _watched("busy", tmp_path)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "stalled" not in stderr and not list(tmp_path.iterdir())


def test_a_failing_rank_names_its_phase_and_keeps_the_traceback(tmp_path: Path) -> None:
    process = _watched("error", tmp_path)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "megamm: rank 5 failed in: test all-reduce (bucket 2), iteration 7" in stderr, stderr
    kept = (tmp_path / "stacks-rank5.txt").read_text()
    assert "failed in: test all-reduce (bucket 2)" in kept and "RuntimeError: Connection closed by peer" in kept


def test_a_terminated_rank_dumps_its_stacks(tmp_path: Path) -> None:
    """torchrun ends the ranks that are still blocked with SIGTERM: their stacks are kept."""
    process = _watched("terminated", tmp_path)
    try:
        assert process.stdout.readline() == "entered\n"
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGTERM
    assert "File" in (tmp_path / "stacks-rank5.txt").read_text()


# ---- collective timeouts ---------------------------------------------------------------------------


def _subgroup_timeout_job() -> tuple[float, str]:
    from megamm.parallel.state import initialize_parallel_state

    state = initialize_parallel_state(timeout_minutes=0.05)  # 3 s, 8 s with the grace
    started = time.monotonic()
    if dist.get_rank() == 1:
        time.sleep(20)  # never joins rank 0's all-reduce
        return 0.0, ""
    try:
        dist.all_reduce(torch.ones(1), group=state.dp_group)
    except RuntimeError as error:
        return time.monotonic() - started, str(error)
    return time.monotonic() - started, "no error"


@pytest.mark.slow
def test_subgroups_time_out_as_configured() -> None:
    """A group made by new_group does not inherit the default group's timeout (gloo's default is 30
    minutes); the state's groups get the configured one."""
    elapsed, error = run_distributed(_subgroup_timeout_job, 2, timeout=120)[0]
    assert error != "no error" and elapsed < 15, (elapsed, error)


# ---- training jobs under torchrun ------------------------------------------------------------------

TRAIN = ["--config", EXAMPLE, "--train-iters", "5", "--log-interval", "1", "--eval-iters", "0",
         "--lr-warmup-iters", "0", "--num-workers", "0"]


def _torchrun(argv: list[str], fault: str, launcher: tuple[str, ...] = (),
              timeout: float = 240) -> tuple[int, list[tuple[float, str]]]:
    """Run megamm.train on 2 ranks with a fault; the exit status and each output line with the
    time it arrived."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *launcher,
               "-m", "megamm.train", *argv]
    process = subprocess.Popen(command, cwd=ROOT, env={**ENV, faults.VARIABLE: fault}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    deadline = time.monotonic() + timeout
    try:
        for line in process.stdout:
            lines.append((time.monotonic(), line))
            if time.monotonic() > deadline:
                break
        process.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        process.kill()
    return process.returncode, lines


def _arrival(lines: list[tuple[float, str]], text: str) -> float:
    return next(at for at, line in lines if text in line)


@pytest.mark.slow
def test_a_rank_stalled_inside_a_step_ends_the_job_with_a_diagnosis(tmp_path: Path) -> None:
    """Rank 1 sleeps at the start of the dp gradient sync of step 3; rank 0 waits in the bucket's
    all-reduce. Each watchdog fires 6 s (--distributed-timeout-minutes 0.1) after its rank entered
    its phase; the first to fire ends the job, and torchrun (polling every 3 s here) ends the other
    with SIGTERM if it has not fired yet. Either way, each rank's stacks are in its file."""
    started = time.monotonic()
    status, lines = _torchrun(TRAIN + ["--distributed-timeout-minutes", "0.1", "--stack-dump-dir", str(tmp_path)],
                              "stall:rank:1:iteration:3:phase:data-parallel gradient sync", ("--monitor-interval", "3"))
    output = "".join(line for _, line in lines)
    assert status != 0 and re.search(r"exitcode\s*:\s*3", output), output[-3000:]
    reports = re.findall(r"megamm: rank (\d) stalled for (\d+\.\d) s in: ([^(]*\([^)]*\)|[^,]*), iteration (\d)", output)
    assert reports, output[-3000:]
    expected = {"0": "data-parallel gradient all-reduce (bucket 0)", "1": "data-parallel gradient sync"}
    for rank, seconds, phase, iteration in reports:
        assert (phase, iteration) == (expected[rank], "3") and 6.0 <= float(seconds) < 8, reports
    assert time.monotonic() - _arrival(lines, "iteration        2/5") < 6 + 20, "the job did not end in time"
    assert time.monotonic() - started < 200
    assert "in finish_grad_sync" in (tmp_path / "stacks-rank0.txt").read_text()
    assert "in strike" in (tmp_path / "stacks-rank1.txt").read_text()


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_job_and_its_peer_names_its_phase(tmp_path: Path) -> None:
    """Rank 1 exits at the start of the dp gradient sync of step 3: gloo reports the closed connection
    to rank 0 inside its all-reduce at once, long before the 5-minute timeout. torchrun polls its
    workers every 3 s here, so rank 0 reports before torchrun ends it."""
    status, lines = _torchrun(TRAIN + ["--distributed-timeout-minutes", "5"],
                              "exit:rank:1:iteration:3:phase:data-parallel gradient sync", ("--monitor-interval", "3"))
    output = "".join(line for _, line in lines)
    assert status != 0 and re.search(r"exitcode\s*:\s*1", output), output[-3000:]
    assert time.monotonic() - _arrival(lines, "iteration        2/5") < 60, "the job waited for the timeout"
    assert "rank 0 failed in: data-parallel gradient all-reduce (bucket 0), iteration 3" in output, output[-3000:]


@pytest.mark.slow
def test_a_slow_rank_is_named_in_the_log_line() -> None:
    """Rank 1 loads its data 1 s slower per step; its peer waits for it in the first all-reduce, so
    wall times are equal, and only busy times tell the ranks apart."""
    status, lines = _torchrun(TRAIN + ["--train-iters", "4", "--log-interval", "2", "--straggler-threshold", "1.5"],
                              "slow:rank:1:seconds:1")
    output = "".join(line for _, line in lines)
    assert status == 0, output[-3000:]
    spreads = re.findall(r"step time spread: max ([0-9.]+) s \(rank (\d)\) / min ([0-9.]+) s \(rank (\d)\)", output)
    assert len(spreads) == 2, output
    for high, slow, low, fast in spreads:
        assert (slow, fast) == ("1", "0") and float(high) - float(low) > 0.7, spreads
