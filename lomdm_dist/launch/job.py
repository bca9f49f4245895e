"""The callable every Slurm task runs: train until done, or save and requeue when time runs out.

How submitit handles time-outs and preemption (submitit 1.5, ``core/job_environment.py``):
the sbatch script asks Slurm for ``--signal=USR2@<signal_delay_s>``, and every task's process
binds that signal (``SUBMITIT_PREEMPT_SIGNAL``, default USR2) to a handler that, on global rank 0
only, calls the job's ``checkpoint()`` method, pickles the ``DelayedSubmission`` it returns,
runs ``scontrol requeue`` (the local executor: exit code 144, which its controller restarts) and
leaves with ``sys.exit``. Other ranks' handlers just return. SIGTERM is logged and ignored.
Time-outs count against the executor's ``max_num_timeout``; preemptions do not.

Called in the middle of a training step, that handler cannot produce a consistent checkpoint, so
:class:`TrainingJob` defers it to a step boundary:

1. the trainer runs as a child process (``python -m lomdm_dist.train CONFIG``, see
   ``supervisor.py``) with the rendezvous variables of this task (torchrun's names, from
   ``submitit.helpers.TorchDistributedEnvironment``) and the NCCL defaults of ``slurm.env``;
2. while it runs, this process owns the preemption signal: on every rank the signal becomes the
   trainer's stop request (SIGUSR1), so each rank finishes its step and the trainer writes a
   complete checkpoint (model, EMA, optimizer, RNG and data-loader state of every rank) and exits 0;
3. only then is submitit's own handler called, with the signal it was meant to receive: on rank 0
   it calls :meth:`TrainingJob.checkpoint`, which returns the same job with its requeue count
   raised (or refuses with :class:`RequeueLimitError` once ``slurm.max_requeues`` is reached),
   and requeues. The requeued job starts the trainer on the same ``run.dir``, which resumes from
   the newest complete checkpoint, as any job started on a run directory with checkpoints does.

Faults: a trainer that exits non-zero or dies of a signal fails the task with
:class:`TaskFailedError` naming the rank, host and log; ``srun --kill-on-bad-exit`` then ends the
other tasks, and a node failure is requeued by Slurm (``--requeue``) and resumes the same way.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
from dataclasses import dataclass, field

import submitit
from submitit.helpers import Checkpointable, TorchDistributedEnvironment

from .supervisor import ChildExit, describe_returncode, run_supervised


class TaskFailedError(RuntimeError):
    """The trainer of one task failed; the message names the rank, host, exit status and log."""


class RequeueLimitError(RuntimeError):
    """A time-out or preemption arrived after ``slurm.max_requeues`` requeues: the job stops."""


def preemption_signal() -> signal.Signals:
    """The signal submitit binds to checkpoint-and-requeue (``SUBMITIT_PREEMPT_SIGNAL``, default USR2)."""
    name = "SIG" + submitit.JobEnvironment.USR_SIG
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"unknown preemption signal {name} (environment variable SUBMITIT_PREEMPT_SIGNAL)") from None


def rendezvous_environment() -> dict[str, str]:
    """torchrun's variables for this task (rank, world size, first node as the rendezvous host).

    ``CUDA_VISIBLE_DEVICES`` is left alone: as under torchrun, every task sees the node's GPUs and
    picks ``LOCAL_RANK``.
    """
    dist = TorchDistributedEnvironment()
    return {"MASTER_ADDR": dist.master_addr, "MASTER_PORT": str(dist.master_port), "RANK": str(dist.rank),
            "WORLD_SIZE": str(dist.world_size), "LOCAL_RANK": str(dist.local_rank),
            "LOCAL_WORLD_SIZE": str(dist.local_world_size)}


def task_environment(defaults: dict[str, str], inherited: dict[str, str], explicit: dict[str, str],
                     rendezvous: dict[str, str]) -> dict[str, str]:
    """The trainer's environment, in increasing precedence: ``defaults`` (only where ``inherited``
    has no value, so a user's own ``export NCCL_DEBUG=INFO`` survives), ``inherited``, ``explicit``
    (``slurm.env``), ``rendezvous`` (always the launcher's)."""
    return {**defaults, **inherited, **explicit, **rendezvous}


@dataclass(frozen=True)
class TaskOutcome:
    """What a task returns to ``job.results()``."""

    status: str
    """``completed`` (the final checkpoint exists) or ``interrupted`` (stopped early, not requeued here)."""
    rank: int
    step: int | None
    """Step of the newest complete checkpoint when the task ended."""
    requeues: int


@dataclass
class TrainingJob(Checkpointable):
    """The submitit callable of one training run; pickled into the job folder and re-pickled on requeue."""

    config_file: str
    """The resolved config written at submission (requeues read this, not the user's YAML)."""
    run_dir: str
    """``run.dir`` as an absolute path (where the trainer's checkpoints are)."""
    max_steps: int
    workdir: str
    """Working directory of the submission; the trainer runs there so relative paths mean the same."""
    default_env: dict[str, str] = field(default_factory=dict)
    """``DEFAULT_TASK_ENV`` (minus what ``slurm.env`` drops): applied where the task has no value."""
    explicit_env: dict[str, str] = field(default_factory=dict)
    """``slurm.env`` entries: always applied."""
    max_requeues: int = 20
    stop_timeout_s: float = 150.0
    trainer_command: tuple[str, ...] = (sys.executable, "-m", "lomdm_dist.train")
    """Program and leading arguments; the config file is appended."""
    requeues: int = 0
    """Requeues so far (time-outs and preemptions); raised by :meth:`checkpoint`."""

    @property
    def command(self) -> list[str]:
        return [*self.trainer_command, self.config_file]

    # ------------------------------------------------------------------------------ submitit hooks
    def __call__(self) -> TaskOutcome:
        job_env = submitit.JobEnvironment()
        rank = job_env.global_rank
        env = task_environment(self.default_env, dict(os.environ), self.explicit_env, rendezvous_environment())
        log = _task_logger(rank)
        log(f"rank {rank}/{env['WORLD_SIZE']} on {socket.gethostname()} (requeue {self.requeues} of at most "
            f"{self.max_requeues}): {' '.join(self.command)}")
        preempt = preemption_signal()
        submitit_handler = signal.getsignal(preempt)
        exit_ = run_supervised(self.command, cwd=self.workdir, env=env, watch=[preempt],
                               stop_timeout_s=self.stop_timeout_s, log=log)
        return self._after_exit(exit_, rank=rank, submitit_handler=submitit_handler, log=log,
                                log_path=_log_path(job_env))

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 (after the trainer saved): the job to requeue, or a refusal."""
        if self.requeues >= self.max_requeues:
            raise RequeueLimitError(
                f"not requeued: slurm.max_requeues ({self.max_requeues}) reached; the run stopped at its newest "
                f"checkpoint in {self.run_dir}/checkpoints (submit the same command again to continue)")
        _task_logger(0)(f"requeueing ({self.requeues + 1} of at most {self.max_requeues})")
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self, requeues=self.requeues + 1),
                                                  *args, **kwargs)

    # ------------------------------------------------------------------------------------ helpers
    def _after_exit(self, exit_: ChildExit, *, rank: int, submitit_handler, log, log_path: str) -> TaskOutcome:
        step = self.latest_step()
        if step is not None and step >= self.max_steps:
            # The final checkpoint is the trainer's last act, so a non-zero status after it is
            # noise at process exit (gloo/NCCL teardown), not a lost result.
            status = describe_returncode(exit_.returncode)
            log(f"training complete at step {step}" + ("" if exit_.returncode == 0 else f" (then {status})"))
            return TaskOutcome("completed", rank, step, self.requeues)
        if exit_.returncode != 0 and not exit_.killed_after_timeout:
            newest = f"step {step}" if step is not None else "none yet"
            raise TaskFailedError(
                f"rank {rank} on {socket.gethostname()}: the trainer ended with "
                f"{describe_returncode(exit_.returncode)} (newest complete checkpoint: {newest}); "
                f"its output is in {log_path}")
        if exit_.stop_signal is not None and callable(submitit_handler):
            log(f"trainer stopped at step {step}; handing {signal.Signals(exit_.stop_signal).name} to submitit")
            submitit_handler(exit_.stop_signal, None)  # rank 0: checkpoint() + requeue + exit; others return
        log(f"trainer stopped before the end (newest checkpoint: step {step})")
        return TaskOutcome("interrupted", rank, step, self.requeues)

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint in ``run_dir`` (None when there is none)."""
        from ..checkpoint.protocol import complete_checkpoints

        found = complete_checkpoints(self.run_dir)
        return found[-1][0] if found else None


def _task_logger(rank: int):
    def log(message: str) -> None:
        print(f"[launch rank {rank}] {message}", file=sys.stderr, flush=True)
    return log


def _log_path(job_env: submitit.JobEnvironment) -> str:
    try:
        return str(job_env.paths.stderr)
    except KeyError:  # SUBMITIT_FOLDER unset: not started by submitit's runner
        return "this task's stderr"


__all__ = ["RequeueLimitError", "TaskFailedError", "TaskOutcome", "TrainingJob", "preemption_signal",
           "rendezvous_environment", "task_environment"]
