"""Typed configs: dataclasses in ``schema``, YAML + overrides in ``loader``."""

from .loader import config_to_dict, load_config, parse_override, save_config
from .parallel import ParallelConfig
from .slurm import SlurmConfig
from .schema import (Config, ConfigError, DataConfig, DiffusionConfig, EvalConfig, ModelConfig,
                     OptimConfig, RunConfig, SampleConfig, TrainConfig)

__all__ = ["Config", "ConfigError", "DataConfig", "DiffusionConfig", "EvalConfig", "ModelConfig",
           "OptimConfig", "ParallelConfig", "RunConfig", "SampleConfig", "SlurmConfig", "TrainConfig", "config_to_dict", "load_config",
           "parse_override", "save_config"]
