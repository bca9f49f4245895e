"""Launching training on a cluster: the Slurm job (``submit``), the callable each task runs and its
requeue policy (``job``), and the supervision of the trainer process (``supervisor``).

``launchers/slurm.py`` is the command line; ``job.py``'s docstring explains how time-outs,
preemption and faults are handled.
"""

from .job import RequeueLimitError, TaskFailedError, TaskOutcome, TrainingJob, preemption_signal
from .submit import JobSpec, build_job_spec, main, resolve_config, submit_job
from .supervisor import ChildExit, run_supervised

__all__ = ["ChildExit", "JobSpec", "RequeueLimitError", "TaskFailedError", "TaskOutcome", "TrainingJob",
           "build_job_spec", "main", "preemption_signal", "resolve_config", "run_supervised", "submit_job"]
