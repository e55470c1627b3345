"""Stopping early and resuming: preemption signals, --exit-interval, --exit-duration-in-mins, a worker
killed under `torchrun --max-restarts`, --load defaulting to --save, and a resume with another global
batch size continuing from the consumed samples.

The end-to-end runs (slow) train examples/tiny_cpu.yaml on 2 gloo ranks (tp 1 x dp 2) for 8 steps and
compare with one uninterrupted reference run: the log's losses of every step after the resume, and
every tensor of the final checkpoints (model, optimizer, generator states) exactly.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megamm.checkpoint import dcp_io, format
from megamm.config.parsing import parse_run_config
from megamm.data.loader import ResumePoint, rank_positions
from megamm.data.synthetic import microbatch_indices
from megamm.training import faults
from megamm.training.preemption import EXIT_STOPPED, StopCheck, StopSignals
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "tiny_cpu.yaml")
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
ENV.pop(faults.VARIABLE, None)
ITERS = 8
TRAIN = ["--config", EXAMPLE, "--train-iters", str(ITERS), "--log-interval", "1", "--eval-iters", "0",
         "--lr-warmup-iters", "0", "--num-workers", "0"]
SIGNALLED = re.escape("a rank received a stop signal (SIGTERM or SIGUSR1)")
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \| consumed samples:\s+(\d+) \|.* lm loss: (\S+) \|")


# ---- the pieces, in this process -------------------------------------------------------------------


SECOND_SIGTERM = """
import os, signal, time
from megamm.training.preemption import StopSignals
signals = StopSignals(3)
with signals:
    os.kill(os.getpid(), signal.SIGTERM)
    print('requested', signals.received, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
"""


def test_a_signal_becomes_a_stop_request_and_a_second_sigterm_terminates() -> None:
    signals = StopSignals(rank=0)
    with signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGUSR1)  # repeated: still alive, the first one is kept
        assert signals.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    child = subprocess.run(
        [sys.executable, "-c", SECOND_SIGTERM],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60, check=False,
    )
    assert child.stdout == "requested SIGTERM\n" and child.returncode == -signal.SIGTERM, child
    assert "rank 3 received SIGTERM: stopping after this step" in child.stderr


def _agreement_job() -> list[str | None]:
    """Rank 1 alone got a signal; rank 0 alone is past its time budget: both ranks see both."""
    import torch.distributed as dist

    from megamm.parallel.state import initialize_parallel_state

    state = initialize_parallel_state()
    rank = dist.get_rank()
    signals = StopSignals(rank)
    if rank == 1:
        signals.received = "SIGTERM"
    asked = StopCheck(signals, None, None, time.monotonic())
    late = StopCheck(StopSignals(rank), 0.0 if rank == 0 else None, None, time.monotonic())
    interval = StopCheck(StopSignals(rank), None, 4, time.monotonic())
    return [asked.reason(asked.share(state), 1), late.reason(late.share(state), 1),
            interval.reason(interval.share(state), 7), interval.reason(interval.share(state), 8)]


def test_every_rank_agrees_to_stop_when_one_rank_asks() -> None:
    for rank, reasons in enumerate(run_distributed(_agreement_job, 2)):
        assert reasons == ["a rank received a stop signal (SIGTERM or SIGUSR1)",
                           "the wall time passed --exit-duration-in-mins", None, "--exit-interval 4"], rank


def test_early_stop_flags_need_save() -> None:
    with pytest.raises(ValueError) as error:
        parse_run_config(["--config", EXAMPLE, "--exit-interval", "2", "--exit-duration-in-mins", "0"], 1)
    assert "--exit-interval needs --save (the checkpoint to continue from)" in str(error.value)
    assert "--exit-duration-in-mins needs --save (the checkpoint to continue from) and a value > 0" in str(error.value)


def test_a_resume_with_another_global_batch_size_continues_the_sample_order() -> None:
    """Run A: G=8 for 4 steps. Run B: G=8 for 2 steps, then resumed with G=16 (consumed samples 16):
    its step reads the samples of A's steps 3 and 4, positions 16..31, on the file and mock paths."""
    dp = 2
    a = {p for it in (2, 3) for r in range(dp) for p in rank_positions(it, 8, r, dp)}
    b = {p for r in range(dp) for p in rank_positions(2, 16, r, dp, ResumePoint(2, 16))}
    assert a == b == set(range(16, 32))
    resume = ResumePoint(2, 16)
    mock = {i for r in range(dp) for chunk in microbatch_indices(resume.first_position(2, 16), 16, 2, r, dp)
            for i in chunk}
    assert mock == b
    assert ResumePoint(2, 16).first_position(3, 16) == 32


# ---- end to end under torchrun ---------------------------------------------------------------------


def _command(argv: list[str], launcher: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *launcher,
            "-m", "megamm.train", *TRAIN, *argv]


def _run(argv: list[str], launcher: tuple[str, ...] = (), env: dict | None = None) -> tuple[int, str]:
    done = subprocess.run(_command(argv, launcher), cwd=ROOT, env={**ENV, **(env or {})}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300, check=False)
    return done.returncode, done.stdout


def _worker(launcher: psutil.Process, rank: int) -> psutil.Process:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "megamm.train" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker of rank {rank} under torchrun {launcher.pid}")


def _signal_after(argv: list[str], after: int, rank: int, number: signal.Signals) -> tuple[int, str]:
    """Run; once the log shows iteration `after`, send `number` to the worker of `rank` only."""
    process = subprocess.Popen(_command(argv), cwd=ROOT, env=ENV, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            match = LOSS.search(line)
            if match and int(match.group(1)) == after:
                _worker(psutil.Process(process.pid), rank).send_signal(number)
        process.wait(timeout=120)
    finally:
        process.kill()
    return process.returncode, "".join(lines)


def _losses(output: str) -> dict[int, tuple[str, str]]:
    """{iteration: (consumed samples, lm loss)} from the log lines."""
    return {int(it): (consumed, loss) for it, consumed, loss in LOSS.findall(output)}


def _stopped_at(output: str, reason: str) -> int:
    match = re.search(rf"stopping after iteration (\d+) of {ITERS}: {reason}; checkpoint of iteration \1 in "
                      rf".*; exiting with status {EXIT_STOPPED}", output)
    assert match, output[-3000:]
    assert re.search(rf"exitcode\s*:\s*{EXIT_STOPPED}", output), output[-3000:]
    return int(match.group(1))


def _latest(save: Path) -> int:
    path = format.resolve(save)
    assert path is not None and (path / format.DESCRIPTION).exists()
    assert not list(save.glob("*" + format.PARTIAL_SUFFIX))
    return int(path.name.removeprefix("iter_"))


def _tensors(save: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the newest checkpoint in `save`, read in this process."""
    path = format.resolve(save)
    meta = dcp_io.saved_tensors(path)
    state = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in meta.items()
             if isinstance(m, TensorStorageMetadata)}
    dcp_io.load(state, dcp_io.reader(path), DefaultLoadPlanner(), None)
    return state


def _assert_same_checkpoint(ours: Path, reference: Path) -> None:
    mine, theirs = _tensors(ours), _tensors(reference)
    assert mine.keys() == theirs.keys()
    different = [key for key in mine if not torch.equal(mine[key], theirs[key])]
    assert not different, different


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, tuple[str, str]], Path]:
    """The uninterrupted run: its losses and its final checkpoint."""
    save = tmp_path_factory.mktemp("reference")
    status, output = _run(["--save", str(save)])
    assert status == 0, output[-3000:]
    losses = _losses(output)
    assert sorted(losses) == list(range(1, ITERS + 1)) and _latest(save) == ITERS
    return losses, save


@pytest.mark.slow
def test_signals_stop_every_rank_after_the_step_and_the_job_resumes_exactly(reference, tmp_path: Path) -> None:
    """SIGTERM to rank 1's worker alone after step 2 is logged: both ranks stop after the same step,
    the checkpoint of that step is complete and `latest`, the ranks exit with 4. The same command
    again (no --load: it defaults to --save) resumes; SIGUSR1 to rank 0 stops it the same way; the
    third run finishes with the reference's losses and final state."""
    losses, reference_save = reference
    argv = ["--save", str(tmp_path)]
    status, output = _signal_after(argv, 2, 1, signal.SIGTERM)
    assert status != 0
    first = _stopped_at(output, SIGNALLED)
    assert 3 <= first < ITERS - 1 and _latest(tmp_path) == first
    assert "rank 1 received SIGTERM: stopping after this step" in output
    assert _losses(output) == {it: losses[it] for it in range(1, first + 1)}

    status, output = _signal_after(argv, first + 1, 0, signal.SIGUSR1)
    assert f"loaded checkpoint {tmp_path}/iter_{first:07d}" in output, output[-3000:]
    second = _stopped_at(output, SIGNALLED)
    assert "rank 0 received SIGUSR1: stopping after this step" in output
    assert first + 2 <= second < ITERS and _latest(tmp_path) == second

    status, output = _run(argv)
    assert status == 0, output[-3000:]
    assert f"loaded checkpoint {tmp_path}/iter_{second:07d}" in output
    assert _losses(output) == {it: losses[it] for it in range(second + 1, ITERS + 1)}
    _assert_same_checkpoint(tmp_path, reference_save)


@pytest.mark.slow
def test_exit_interval_and_exit_duration_stop_with_a_checkpoint(tmp_path: Path) -> None:
    """--exit-interval 2 stops after step 2 (not at the end, where the run is finished anyway);
    resumed with --exit-duration-in-mins 0.0001 (6 ms, passed during the first step) it stops after
    step 3."""
    _, output = _run(["--save", str(tmp_path), "--exit-interval", "2"])
    assert _stopped_at(output, "--exit-interval 2") == 2 == _latest(tmp_path)
    _, output = _run(["--save", str(tmp_path), "--exit-duration-in-mins", "0.0001"])
    assert _stopped_at(output, "the wall time passed --exit-duration-in-mins") == 3 == _latest(tmp_path)
    assert sorted(_losses(output)) == [3]


@pytest.mark.slow
def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_ends_bit_exact(reference, tmp_path: Path) -> None:
    """Rank 1 SIGKILLs itself in step 5 (first attempt only); torchrun --max-restarts 1 restarts
    the group, which resumes from iteration 4 (the last --save-interval checkpoint) and ends with
    the uninterrupted run's losses and final state."""
    losses, reference_save = reference
    status, output = _run(["--save", str(tmp_path), "--save-interval", "2"], ("--max-restarts", "1"),
                          {faults.VARIABLE: "kill:rank:1:iteration:5"})
    assert status == 0, output[-3000:]
    assert f"loaded checkpoint {tmp_path}/iter_0000004" in output, output[-3000:]
    resumed = output[output.index(f"loaded checkpoint {tmp_path}/iter_0000004"):]
    assert _losses(resumed) == {it: losses[it] for it in range(5, ITERS + 1)}
    _assert_same_checkpoint(tmp_path, reference_save)


@pytest.mark.slow
def test_a_resume_with_another_global_batch_size_counts_consumed_samples(tmp_path: Path) -> None:
    """G=8 for 2 steps, then resumed with G=16 for 1 step: the resumed step starts at consumed
    samples 16 and ends at 32, and the checkpoint stores 32."""
    status, output = _run(["--save", str(tmp_path), "--train-iters", "2", "--global-batch-size", "8"])
    assert status == 0, output[-3000:]
    status, output = _run(["--save", str(tmp_path), "--train-iters", "3", "--global-batch-size", "16"])
    assert status == 0, output[-3000:]
    assert {it: consumed for it, (consumed, _) in _losses(output).items()} == {3: "32"}
    consumed = _tensors(tmp_path)[format.CONSUMED_SAMPLES]
    assert consumed.tolist() == [32.0]
