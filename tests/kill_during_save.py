"""`megamm.train` whose rank 1 is SIGKILLed while it writes its shard of the second checkpoint.

Run under torchrun by tests/checkpoint/test_crash_during_save.py: the first checkpoint must stay complete,
loadable and named by `latest`.
"""

import os
import signal
import sys

from torch.distributed.checkpoint import FileSystemWriter

from megamm import train

_original_write = FileSystemWriter.write_data
_saves = {"count": 0}


def _write_then_die(self, plan, planner):
    _saves["count"] += 1
    if _saves["count"] == 2 and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return _original_write(self, plan, planner)


FileSystemWriter.write_data = _write_then_die

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
