"""The ``slurm.*`` config section: defaults for ``launchers/slurm.py`` and the job's environment.

Command-line flags of the launcher win over these values; the section exists so that a config
such as ``configs/1b.yaml`` carries the allocation it was designed for (nodes, GPUs per node,
time limit, requeue policy) next to the layout that needs it.

``slurm.env`` is normalised when the section is built (``__post_init__``: names checked, numbers
turned into strings); the other keys are checked by :meth:`SlurmConfig.validate`, which
``Config.validate`` runs with every other section, so a bad value fails at load time with a
message that names the ``slurm.`` key, before anything is submitted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

DEFAULT_TASK_ENV: dict[str, str] = {
    # Tear a process down when a collective fails or times out (torch's current default, pinned
    # here so that older and newer torch behave alike): a dead or stuck rank ends the job with
    # the error in its log instead of leaving the others waiting until the time limit.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    # NCCL's own warnings (transport fall-backs, IB errors) in every task's log.
    "NCCL_DEBUG": "WARN",
    # FSDP2 frees all-gathered parameters on the right stream without recordStream (less memory).
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    # A Python traceback for every thread when a task dies of SIGSEGV/SIGABRT/SIGBUS.
    "PYTHONFAULTHANDLER": "1",
    # Task logs in the order things happened.
    "PYTHONUNBUFFERED": "1",
}
"""Environment every training task gets unless the task's environment already sets the variable;
``slurm.env`` entries replace these (a ``null`` value drops a default)."""

RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
"""Set by the launcher for every task (torchrun's names); ``slurm.env`` may not set them."""

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class SlurmConfig:
    nodes: int = 1
    """Nodes of the allocation (``--nodes``)."""
    gpus_per_node: int = 8
    """GPUs per node; one task (process) runs per GPU (``--gpus-per-node``)."""
    partition: str = ""
    """Slurm partition (empty: the cluster's default)."""
    account: str = ""
    """Slurm account to charge (empty: the user's default)."""
    qos: str = ""
    """Slurm quality of service (empty: the default)."""
    time_min: int = 1440
    """Time limit of one allocation in minutes (``--time``); the job requeues itself when it is reached."""
    constraint: str = ""
    """Node feature constraint, e.g. ``h100`` (empty: none)."""
    exclusive: bool = False
    """Ask for whole nodes (``--exclusive``)."""
    job_name: str = ""
    """Job name shown by squeue (empty: ``run.name``, else the name of ``run.dir``)."""
    cpus_per_task: int = 0
    """CPU cores per task (per GPU); 0 leaves it to Slurm."""
    mem_gb: int = 0
    """Memory per node in GB; 0 leaves it to Slurm (note: Slurm's own ``--mem=0`` means all memory)."""
    signal_delay_s: int = 180
    """Seconds before the time limit at which Slurm sends the time-out signal: must cover finishing
    the current step, writing a checkpoint and requeueing."""
    stop_timeout_s: int = 150
    """Seconds a task waits for the trainer to save and exit after a time-out or preemption signal;
    after that the trainer is killed and the job still requeues (resuming from the previous
    complete checkpoint). Must be less than ``signal_delay_s``."""
    max_requeues: int = 20
    """Requeues (time-outs and preemptions together) after which the job stops instead."""
    setup: tuple[str, ...] = ()
    """Shell lines run on the first node before the tasks start (``module load ...``, ``source venv/bin/activate``)."""
    env: Any = field(default_factory=dict)
    """Environment variables for every task, a mapping NAME: value. They replace the defaults of
    ``DEFAULT_TASK_ENV`` and anything inherited; ``null`` drops a default."""

    def __post_init__(self) -> None:
        self.env = _normalise_env(self.env)

    @property
    def world_size(self) -> int:
        """Processes in the job: one per GPU."""
        return self.nodes * self.gpus_per_node

    def validate(self) -> "SlurmConfig":
        """Reject impossible values; every message names the key."""
        at_least = {"slurm.nodes": (self.nodes, 1), "slurm.gpus_per_node": (self.gpus_per_node, 1),
                    "slurm.time_min": (self.time_min, 1), "slurm.cpus_per_task": (self.cpus_per_task, 0),
                    "slurm.mem_gb": (self.mem_gb, 0), "slurm.signal_delay_s": (self.signal_delay_s, 1),
                    "slurm.stop_timeout_s": (self.stop_timeout_s, 1), "slurm.max_requeues": (self.max_requeues, 0)}
        for key, (value, low) in at_least.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
        if self.stop_timeout_s >= self.signal_delay_s:
            raise ConfigError(f"slurm.stop_timeout_s ({self.stop_timeout_s}) must be less than slurm.signal_delay_s "
                              f"({self.signal_delay_s}): the trainer has to stop before Slurm kills the job")
        if self.signal_delay_s >= self.time_min * 60:
            raise ConfigError(f"slurm.signal_delay_s ({self.signal_delay_s}) must be shorter than slurm.time_min "
                              f"({self.time_min} minutes)")
        return self

    def task_defaults(self) -> dict[str, str]:
        """``DEFAULT_TASK_ENV`` without the names ``slurm.env`` sets or drops."""
        return {name: value for name, value in DEFAULT_TASK_ENV.items() if name not in self.env}

    def task_overrides(self) -> dict[str, str]:
        """The ``slurm.env`` entries that set a value."""
        return {name: value for name, value in self.env.items() if value is not None}


def _normalise_env(env: Any) -> dict[str, str | None]:
    """``slurm.env`` as ``{name: str or None}``; numbers become strings, anything else is an error."""
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise ConfigError(f"slurm.env must be a mapping of variable names to values, got {env!r}")
    out: dict[str, str | None] = {}
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ConfigError(f"slurm.env: {name!r} is not a valid environment variable name")
        if name in RENDEZVOUS_VARIABLES:
            raise ConfigError(f"slurm.env.{name} cannot be set: the launcher sets {name} for every task")
        if value is None or isinstance(value, str):
            out[name] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = str(value)
        else:
            raise ConfigError(f"slurm.env.{name} must be a string, a number or null, got {value!r}")
    return out
