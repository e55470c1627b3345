"""The config layer: dataclasses for the model, the parallel layout and the run, their validation
(every problem at once), YAML and flag parsing, and the registries of pluggable parts.

It imports no implementation layer (enforced by the import-linter contract in pyproject.toml), so
anything may depend on it. The model dataclasses are re-exported here, the most used names.
"""

from megamm.config.model import (
    ConfigError,
    InternViTConfig,
    LanguageConfig,
    LlavaConfig,
    ParallelConfig,
    ProjectorConfig,
    TransformerConfig,
    VisionConfig,
)

__all__ = [
    "ConfigError",
    "InternViTConfig",
    "LanguageConfig",
    "LlavaConfig",
    "ParallelConfig",
    "ProjectorConfig",
    "TransformerConfig",
    "VisionConfig",
]
