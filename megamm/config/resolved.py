"""What a run config implies, derived once: the values training, generation, export and resharding
read instead of recomputing them.

`resolve(run, world_size)` validates the run (ConfigError with every problem) and returns a frozen
`ResolvedConfig`. Each value comes from the one function that defines it (megamm.config.run,
megamm.config.layout, ParallelConfig), which `RunConfig.problems` uses as well, so validation and
the run agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamm.config.layout import virtual_stages
from megamm.config.lora import LoraConfig
from megamm.config.model import ConfigError, LlavaConfig, ParallelConfig
from megamm.config.run import RunConfig, TrainingConfig, training_model_config


@dataclass(frozen=True)
class ResolvedConfig:
    """A validated run and what follows from it on `world_size` processes.

    `model` is the model the run builds (training flags applied: dtype, recompute, freezing);
    `run.model` is the model section as written (what a checkpoint saves).
    """

    run: RunConfig
    world_size: int
    data_parallel_size: int
    microbatches_per_step: int  # per data-parallel rank and optimizer step
    virtual_stages: int  # model chunks per pipeline stage
    lr_decay_iters: int  # steps from the start to the end of the decay
    params_dtype: torch.dtype
    sequence_parallel: bool  # --sequence-parallel and tp > 1
    model: LlavaConfig
    lora: LoraConfig | None  # the adapters the model builder adds (None: no LoRA)

    @property
    def training(self) -> TrainingConfig:
        return self.run.training

    @property
    def parallel(self) -> ParallelConfig:
        return self.run.parallel


def resolve(run: RunConfig, world_size: int) -> ResolvedConfig:
    """Validate `run` for `world_size` processes and derive its values; ConfigError listing every problem."""
    problems = run.problems(world_size)
    if problems:
        raise ConfigError(problems)
    t, p = run.training, run.parallel
    dp = p.data_parallel_size(world_size)
    return ResolvedConfig(
        run=run,
        world_size=world_size,
        data_parallel_size=dp,
        microbatches_per_step=t.microbatches_per_step(dp),
        virtual_stages=virtual_stages(
            run.model.language.transformer.num_layers, p.pipeline_model_parallel_size,
            p.num_layers_per_virtual_pipeline_stage,
        ),
        lr_decay_iters=t.lr_decay_length,
        params_dtype=t.params_dtype,
        sequence_parallel=p.sequence_parallel_in_effect,
        model=training_model_config(run),
        lora=t.lora,
    )
