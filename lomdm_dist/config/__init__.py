"""Typed configs: dataclasses in ``schema``, YAML + overrides in ``loader``."""

from .errors import ConfigError
from .loader import config_from_yaml, config_to_dict, load_config, parse_override, save_config
from .parallel import ParallelConfig
from .schema import (Config, DataConfig, DiffusionConfig, EvalConfig, ModelConfig, OptimConfig, RunConfig,
                     SampleConfig, TrainConfig)
from .slurm import SlurmConfig

__all__ = ["Config", "ConfigError", "DataConfig", "DiffusionConfig", "EvalConfig", "ModelConfig",
           "OptimConfig", "ParallelConfig", "RunConfig", "SampleConfig", "SlurmConfig", "TrainConfig",
           "config_from_yaml", "config_to_dict", "load_config", "parse_override", "save_config"]
