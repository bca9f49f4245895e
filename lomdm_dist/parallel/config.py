"""The ``parallel.*`` config section lives with the other typed configs (``lomdm_dist.config.parallel``);
re-exported here for the engine's modules."""

from ..config.parallel import ActivationCheckpointing, ParallelConfig, PipelineSchedule

__all__ = ["ActivationCheckpointing", "ParallelConfig", "PipelineSchedule"]
