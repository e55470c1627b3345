"""`megamm.train` with a fault injected on the last pipeline stage's third backward.

Run under torchrun by tests/pipeline/test_p2p.py to show that a rank that raises ends the
whole job with its error, instead of leaving its peers blocked until the collective timeout.
"""

import sys

from megamm import train
from megamm.pipeline import schedules

_original_backward = schedules.PipelineSchedule._backward
_calls = {"last_stage": 0}


def _failing_backward(self, *args):
    if self.state.is_last_stage:
        _calls["last_stage"] += 1
        if _calls["last_stage"] == 3:
            raise RuntimeError("injected failure on the last pipeline stage")
    return _original_backward(self, *args)


schedules.PipelineSchedule._backward = _failing_backward

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
