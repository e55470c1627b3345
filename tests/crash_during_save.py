"""One process trains a tiny model, saves iteration 1, then saves iteration 2 and trains on.

    MEGAMM_CHECKPOINT_FAULT=POINT:iteration:2 python -m tests.crash_during_save SAVE_DIR [--async-save]

Run by tests/checkpoint/test_integrity.py with a crash point of megamm.checkpoint.faults: the
process exits with status 1 inside the second save (in the background thread with --async-save,
while the main thread trains), and iteration 1 must stay complete and named by `latest`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from megamm.checkpoint.checkpointer import Checkpointer
from megamm.config import ParallelConfig
from megamm.config.resolved import resolve
from megamm.config.run import RunConfig, TrainingConfig
from megamm.data.loader import ResumePoint
from megamm.parallel.state import ParallelState
from megamm.pipeline.chunks import build_model_chunks
from megamm.training.data import SyntheticData
from megamm.training.step import build_trainer, train_step
from tests.tiny import llava_config


def main(save: Path, async_save: bool) -> int:
    run = RunConfig(model=llava_config(), parallel=ParallelConfig(),
                    training=TrainingConfig(micro_batch_size=1, global_batch_size=1, seq_length=48, train_iters=3,
                                            mock_data=True, seed=3, images_per_sample=1))
    state = ParallelState.single()
    config = resolve(run, state.world_size)
    state.seed(config.training.seed)
    trainer = build_trainer(config, state, build_model_chunks(config, state))
    data = SyntheticData(config, state, ResumePoint())
    checkpointer = Checkpointer(state, config, trainer.chunks, trainer.optimizer, trainer.scaler, save_dir=save,
                                async_save=async_save, log=lambda _: None)
    for iteration in (1, 2):
        train_step(trainer, data.microbatches(iteration - 1), iteration - 1)
        checkpointer.save(iteration, iteration)
    train_step(trainer, data.microbatches(2), 2)  # training goes on while an async save is written
    checkpointer.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), "--async-save" in sys.argv[2:]))
