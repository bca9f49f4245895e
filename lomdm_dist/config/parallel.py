"""The ``parallel.*`` config section: how one training step is spread over processes.

The four sizes name the dimensions of the device mesh (see ``mesh.py``); their product must equal
the number of processes. :meth:`ParallelConfig.validate` checks the section's own keys (sizes,
choices, the pipeline schedule's needs) with the rest of the config; ``layout.validate_layout``
checks it against the world size, the model and the batch before any process group exists, so a
bad layout fails in the launcher with a message that names the key instead of hanging in a
collective.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .errors import ConfigError

ActivationCheckpointing = Literal["none", "selective", "full"]
PipelineSchedule = Literal["1f1b", "gpipe", "interleaved_1f1b"]

_SIZE_KEYS = ("pp", "dp_replicate", "dp_shard", "tp", "virtual_stages")


def _is_count(value: Any, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (Megatron column/row split of every attention and MLP, vocab-parallel
    embedding and output). Must divide model.n_heads, model.d_model and the MLP width."""
    pp: int = 1
    """Pipeline-parallel size: the DiT blocks are split into pp stages of equal depth."""
    dp_shard: int = 1
    """Data-parallel degree that shards parameters, gradients and optimizer state (FSDP2)."""
    dp_replicate: int = 1
    """Data-parallel degree that replicates (HSDP across dp_shard groups; plain DDP when dp_shard is 1)."""
    sequence_parallel: bool = False
    """Shard norms, residuals and dropout along the sequence inside the tensor-parallel group
    (needs tp > 1 and data.seq_len divisible by tp)."""
    microbatches: int = 0
    """Pipeline microbatches per step; the local batch must divide by it. Ignored when pp is 1.
    0 (the default) follows the layout: ``pp`` microbatches, the fewest with which 1F1B keeps every
    pipeline rank busy, so ``parallel.pp=N`` alone is a complete layout whatever N is. The config
    (and a run's saved config.yaml) keeps the 0; ``layout.validate_layout`` and
    ``layout.parallel_section`` hand the pipeline the resolved count (see ``resolved``). An
    explicit value is checked: at least ``pp`` for 1f1b, a whole number of rounds for
    interleaved_1f1b. More microbatches shrink the pipeline bubble (idle fraction about
    (pp - 1) / (microbatches + pp - 1)) at the cost of smaller per-stage matrix products."""
    activation_checkpointing: ActivationCheckpointing = "none"
    """Recompute activations in backward: none, selective (every other block) or full (every block)."""
    compile: bool = False
    """torch.compile each DiT block (per block, so pipeline stages and FSDP units stay separate)."""
    pipeline_schedule: PipelineSchedule = "1f1b"
    """Schedule of the masked (with-grad) pipeline pass. interleaved_1f1b puts
    ``virtual_stages`` stages on each pipeline rank."""
    virtual_stages: int = 1
    """Pipeline stages per pipeline rank (only interleaved_1f1b uses more than 1)."""
    collective_timeout_s: float = 600.0
    """Timeout of every collective: a rank that died or hangs brings the others down with an error
    instead of a silent hang."""

    @property
    def dp(self) -> int:
        """Total data-parallel degree: how many different slices of the global batch exist."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def num_stages(self) -> int:
        """Pipeline stages in total (pp ranks times virtual stages per rank)."""
        return self.pp * self.virtual_stages

    def validate(self) -> "ParallelConfig":
        """Reject values of the section that no world size makes valid; every message names the key.
        (The section is also built directly, e.g. by tests and tools, so the type checks that the
        loader makes for YAML are repeated for the sizes.)"""
        for key in _SIZE_KEYS:
            value = getattr(self, key)
            if not _is_count(value, 1):
                raise ConfigError(f"parallel.{key} must be a positive integer, got {value!r}")
        if not _is_count(self.microbatches, 0):
            raise ConfigError(f"parallel.microbatches must be a positive integer or 0 (automatic: parallel.pp), "
                              f"got {self.microbatches!r}")
        modes = get_args(ActivationCheckpointing)
        if self.activation_checkpointing not in modes:
            raise ConfigError(f"parallel.activation_checkpointing must be one of {', '.join(modes)}; "
                              f"got {self.activation_checkpointing!r}")
        schedules = get_args(PipelineSchedule)
        if self.pipeline_schedule not in schedules:
            raise ConfigError(f"parallel.pipeline_schedule must be one of {', '.join(schedules)}; "
                              f"got {self.pipeline_schedule!r}")
        if self.pipeline_schedule == "interleaved_1f1b":
            if self.virtual_stages < 2:
                raise ConfigError("parallel.pipeline_schedule interleaved_1f1b needs parallel.virtual_stages >= 2, "
                                  f"got {self.virtual_stages}")
        elif self.virtual_stages != 1:
            raise ConfigError(f"parallel.virtual_stages ({self.virtual_stages}) > 1 needs "
                              f"parallel.pipeline_schedule interleaved_1f1b, got {self.pipeline_schedule}")
        if self.collective_timeout_s <= 0:
            raise ConfigError(f"parallel.collective_timeout_s must be positive, got {self.collective_timeout_s}")
        return self

    def resolved_microbatches(self) -> int:
        """Microbatches the pipeline runs: ``microbatches``, or ``pp`` when it is 0 (automatic)."""
        return self.microbatches or self.pp

    def resolved(self) -> "ParallelConfig":
        """This section with ``microbatches`` resolved: a copy when it is automatic under a pipeline,
        else itself (with pp 1 nothing reads the count). The config keeps 0, so a run's saved
        config stays valid when it resumes in another layout."""
        if self.microbatches or self.pp == 1:
            return self
        return dataclasses.replace(self, microbatches=self.resolved_microbatches())
