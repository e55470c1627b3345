"""Projectors from vision features to the language model's embedding space, one module per type.

Each type (registered in megamm.config.registry.PROJECTORS) is a `Projector` subclass that builds its
layers, runs them and counts its FLOPs per image token; the token count comes from the config
(`ProjectorConfig.output_tokens`), since pixel shuffle, the one thing that changes it, composes with
every type.
"""

from __future__ import annotations

import torch

from megamm.config import ProjectorConfig
from megamm.config.registry import PROJECTORS
from megamm.models.projectors.base import Projector
from megamm.parallel.state import ParallelState


def projector_class(config: ProjectorConfig) -> type[Projector]:
    return PROJECTORS.get(config.type)


def build_projector(config: ProjectorConfig, vision_hidden: int, language_hidden: int, grid_size: int,
                    state: ParallelState, init_std: float, dtype: torch.dtype) -> Projector:
    return projector_class(config)(config, vision_hidden, language_hidden, grid_size, state, init_std, dtype)
