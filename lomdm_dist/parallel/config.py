"""The ``parallel.*`` config section, re-exported where the engine's code looks for it.

The dataclass lives with the other typed configs (``lomdm_dist/config/parallel.py``) so that the
config package does not import the distributed engine; ``layout.validate_layout`` checks it.
"""

from ..config.parallel import ActivationCheckpointing, ParallelConfig, PipelineSchedule

__all__ = ["ActivationCheckpointing", "ParallelConfig", "PipelineSchedule"]
