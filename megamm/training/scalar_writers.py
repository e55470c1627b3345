"""Where the log's scalars go besides the log line: TensorBoard (--tensorboard-dir) and Weights &
Biases (--wandb-project, --wandb-exp-name, --wandb-save-dir).

Both receive the same `{name: value}` at the same iteration from the printing rank (`Reporter` in
megamm.train: tensor rank 0, data rank 0, last pipeline stage, the one rank that holds the loss),
so the two backends always agree. Weights & Biases also gets the run config: the config tree a
checkpoint saves (model, parallel, training sections) plus the world and data-parallel sizes, as
Megatron passes its arguments to `wandb.init(config=...)`. Offline runs (WANDB_MODE=offline) write
the run directory only; `wandb sync DIR` uploads it later.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

from megamm.config.parsing import run_config_to_dict

if TYPE_CHECKING:
    from megamm.config.resolved import ResolvedConfig


class ScalarWriter(Protocol):
    def scalars(self, iteration: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardWriter:
    """Scalars as TensorBoard events in `directory`, the iteration as the step."""

    def __init__(self, directory: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(directory)

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, iteration)

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """Scalars as one Weights & Biases history row per iteration (`step=iteration`, so a resumed
    run's rows continue at the checkpoint's iteration and a validation loss joins its step's row)."""

    def __init__(self, project: str, name: str, directory: str, config: dict) -> None:
        import wandb

        # wandb.init expects the directory to exist (Megatron creates it as well).
        os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(project=project, name=name, dir=directory, config=config)

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        self.run.log(values, step=iteration)

    def close(self) -> None:
        self.run.finish()


def wandb_config(config: ResolvedConfig) -> dict:
    """The run config W&B records: the saved config tree plus the sizes the world implies."""
    return {**run_config_to_dict(config.run), "world_size": config.world_size,
            "data_parallel_size": config.data_parallel_size}


def scalar_writers(config: ResolvedConfig) -> list[ScalarWriter]:
    """The backends the run's flags ask for (validated up front by megamm.config.run)."""
    t = config.training
    writers: list[ScalarWriter] = []
    if t.tensorboard_dir:
        writers.append(TensorBoardWriter(t.tensorboard_dir))
    if t.wandb_project:
        writers.append(WandbWriter(t.wandb_project, t.wandb_exp_name, t.wandb_dir, wandb_config(config)))
    return writers
