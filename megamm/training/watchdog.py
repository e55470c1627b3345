"""A per-rank watchdog that ends a stalled job with a diagnosis instead of a silent hang.

A rank whose peer died or stalls blocks inside a collective, in C++, where no Python exception can
reach it. The watchdog is a daemon thread that reads the rank's phase record
(megamm.parallel.phase): when one phase has lasted `timeout_s`, it prints which operation the rank
is stuck in and for how long, dumps the Python stacks of all threads (faulthandler) to stderr and
to `stacks-rank<R>.txt` in the dump directory, and ends the process with `EXIT_STALLED`.

It costs the training thread nothing: the thread sleeps until the deadline of the phase it last
saw and, if the phase changed meanwhile, sleeps until the new phase's deadline. Phase changes do
not notify it.

A rank that raises (gloo reports a peer that died as a connection error inside the collective)
also gets one line naming the phase it failed in, and its file keeps that line and the traceback. A rank that is still blocked when torchrun tears
the job down is ended with SIGTERM; faulthandler is registered for SIGTERM too, so that rank's stacks
land in the same file (stderr without a dump directory) before it terminates. It chains to the
handler installed before it: in megamm.train that is the preemption stop request
(megamm.training.preemption), so a first SIGTERM dumps the stacks and asks for a graceful stop.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from types import TracebackType
from typing import IO

from megamm.parallel.phase import Phase, PhaseRecord

# The exit status of a rank the watchdog ended (docs/training.md lists every exit status).
EXIT_STALLED = 3


def stack_file_name(rank: int) -> str:
    return f"stacks-rank{rank}.txt"


def _forget_sigterm_dump_in_child() -> None:
    # A forked data-loader worker inherits the handler and the file descriptor; its stacks would be
    # interleaved with the rank's.
    faulthandler.unregister(signal.SIGTERM)


os.register_at_fork(after_in_child=_forget_sigterm_dump_in_child)


class Watchdog:
    """Ends this process with a diagnosis when a phase of `record` lasts `timeout_s`.

    Use as a context manager around the training loop. `limit` names the setting the timeout comes
    from, for the message.
    """

    def __init__(
        self, record: PhaseRecord, timeout_s: float, rank: int, dump_dir: str | None, limit: str
    ) -> None:
        self.record = record
        self.timeout_s = timeout_s
        self.rank = rank
        self.limit = limit
        self.dump_path = Path(dump_dir) / stack_file_name(rank) if dump_dir else None
        self._file: IO[str] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._firing = False
        self._thread = threading.Thread(target=self._watch, name=f"megamm-watchdog-rank{rank}", daemon=True)

    def __enter__(self) -> None:
        if self.dump_path is not None:
            self.dump_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.dump_path.open("w")
        faulthandler.register(signal.SIGTERM, file=self._file or sys.stderr, all_threads=True, chain=True)
        self._thread.start()

    def __exit__(
        self, error_type: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        with self._lock:
            firing = self._firing
            self._stop.set()
        if firing:
            # The training thread got here (a collective's own timeout raised, say) while the
            # watchdog is reporting: let it finish; it ends the process.
            threading.Event().wait()
        if error is not None:
            self._report_error(error)
        self._thread.join()
        faulthandler.unregister(signal.SIGTERM)
        if self._file is not None:
            self._file.close()
            if self.dump_path.stat().st_size == 0:
                self.dump_path.unlink()

    def _report_error(self, error: BaseException) -> None:
        """The traceback Python prints says what failed; this line says where in the step (a peer
        that died shows up as a connection error inside a collective). The dump file keeps both."""
        text = f"megamm: rank {self.rank} failed in: {self.record.current.describe()}"
        print(text, file=sys.stderr, flush=True)
        if self._file is not None:
            self._file.write(text + "\n" + "".join(traceback.format_exception(error)))

    def _watch(self) -> None:
        while True:
            phase = self.record.current
            remaining = phase.started + self.timeout_s - self.record.clock()
            if remaining > 0:
                if self._stop.wait(remaining):
                    return
                continue
            if self.record.current.serial != phase.serial:
                continue
            with self._lock:
                if self._stop.is_set():
                    return
                self._firing = True
            self._fire(phase)

    def message(self, phase: Phase) -> str:
        stalled = self.record.clock() - phase.started
        where = f" (also in {self.dump_path})" if self.dump_path is not None else ""
        return (
            f"megamm: rank {self.rank} stalled for {stalled:.1f} s in: {phase.describe()} "
            f"(limit {self.timeout_s:g} s, {self.limit}); the Python stacks of all its threads "
            f"follow{where}; exiting with status {EXIT_STALLED}"
        )

    def _fire(self, phase: Phase) -> None:
        text = self.message(phase)
        for stream in (sys.stderr, self._file):
            if stream is not None:
                stream.write(text + "\n")
                stream.flush()
                faulthandler.dump_traceback(stream, all_threads=True)
        os._exit(EXIT_STALLED)
