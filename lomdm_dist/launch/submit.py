"""Resolve, show and submit the Slurm job of a training config: the logic behind ``launchers/slurm.py``.

One task per GPU, all running :class:`~lomdm_dist.launch.job.TrainingJob` through
``submitit.AutoExecutor``. Everything that can be checked before Slurm sees the job is checked
here, so a mistake costs seconds on the login node rather than a place in the queue: the config
(loader), the ``slurm`` section (its ``__post_init__``), the parallel layout against
``nodes x gpus_per_node`` (``lomdm_dist.parallel.layout.validate_layout``) and the data manifest.

The resolved config is written to ``<run.dir>/slurm/config-<time>.yaml`` at submission and the
tasks train from that file, so a requeued job trains exactly what was submitted even if the YAML
it came from has been edited since. submitit's job folder and task logs are
``<run.dir>/slurm/<job id>/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Sequence

from ..config import Config, ConfigError, load_config, save_config
from .job import TrainingJob, preemption_signal

Cluster = Literal["slurm", "local"]
ROOT = Path(__file__).resolve().parents[2]
"""The repository root: tasks need it on ``PYTHONPATH`` to unpickle the job and run the trainer."""


@dataclass(frozen=True)
class JobSpec:
    """Everything about one submission, resolved; ``describe()`` is what ``--dry-run`` prints."""

    cluster: Cluster
    folder: str
    """submitit's job folder (``%j`` becomes the job id)."""
    executor_parameters: dict[str, Any]
    """Arguments of ``AutoExecutor.update_parameters``."""
    max_num_timeout: int
    nodes: int
    tasks_per_node: int
    world_size: int
    layout: dict[str, Any]
    job: TrainingJob
    warnings: tuple[str, ...] = ()
    config_file_shown: str = ""
    """How ``describe()`` names the config file: the file does not exist until :func:`submit_job`
    writes it, and its default name carries the time of that submission, not of the dry run."""

    def describe(self) -> dict[str, Any]:
        """The job as ``--dry-run`` prints it. It names the config file the tasks will train from
        as it will be written at submission, and writes nothing itself."""
        task_command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(self.folder)])
        config_file = self.config_file_shown or self.job.config_file
        return {
            "cluster": self.cluster,
            "job_folder": self.folder,
            "executor_parameters": self.executor_parameters,
            "max_num_timeout": self.max_num_timeout,
            "nodes": self.nodes,
            "tasks_per_node": self.tasks_per_node,
            "tasks": self.nodes * self.tasks_per_node,
            "world_size": self.world_size,
            "task_command": task_command,
            "trainer_command": [*self.job.trainer_command, config_file],
            "workdir": self.job.workdir,
            "environment": {
                "defaults_unless_set": self.job.default_env,
                "explicit": self.job.explicit_env,
                "per_task": {"MASTER_ADDR": "first node of the allocation",
                             "MASTER_PORT": "$MASTER_PORT, else derived from the job id",
                             "RANK": "SLURM_PROCID", "LOCAL_RANK": "SLURM_LOCALID",
                             "WORLD_SIZE": str(self.world_size), "LOCAL_WORLD_SIZE": str(self.tasks_per_node)},
            },
            "layout": self.layout,
            "requeue": {"signal": preemption_signal().name,
                        "signal_delay_s": self.executor_parameters.get("slurm_signal_delay_s"),
                        "stop_timeout_s": self.job.stop_timeout_s, "max_requeues": self.job.max_requeues},
            "run_dir": self.job.run_dir,
            "config_written_at_submission": config_file,
            "max_steps": self.job.max_steps,
            "warnings": list(self.warnings),
        }


def resolve_layout(cfg: Config, world_size: int) -> dict[str, Any]:
    """The ``parallel`` section checked against the job's process count, the model and the batch."""
    par = cfg.parallel
    if par.world_size != world_size:
        s = cfg.slurm
        raise ConfigError(
            f"slurm.nodes ({s.nodes}) x slurm.gpus_per_node ({s.gpus_per_node}) = {world_size} processes, but "
            f"parallel.tp ({par.tp}) x parallel.pp ({par.pp}) x parallel.dp_shard ({par.dp_shard}) x "
            f"parallel.dp_replicate ({par.dp_replicate}) = {par.world_size}; change one side")
    from ..parallel.layout import validate_layout

    checked = validate_layout(cfg, world_size)
    return {**dataclasses.asdict(checked), "dp": checked.dp, "world_size": checked.world_size}


def data_problems(cfg: Config) -> list[str]:
    """Input files the job will need that do not exist here (relative to the working directory)."""
    if cfg.data.source != "shards":
        return []
    paths = {"data.path": cfg.data.path}
    if cfg.data.val_path:
        paths["data.val_path"] = cfg.data.val_path
    return [f"{key} {path!r} does not exist (from {os.getcwd()})" for key, path in paths.items()
            if not Path(path).exists()]


def executor_parameters(cfg: Config) -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` arguments for the ``slurm`` section."""
    s = cfg.slurm
    params: dict[str, Any] = {
        "name": s.job_name or cfg.run.name or Path(cfg.run.dir).resolve().name,
        "timeout_min": s.time_min, "nodes": s.nodes, "tasks_per_node": s.gpus_per_node,
        "gpus_per_node": s.gpus_per_node,
    }
    if s.cpus_per_task:
        params["cpus_per_task"] = s.cpus_per_task
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    if s.exclusive:
        params["slurm_exclusive"] = True
    params.update(
        slurm_signal_delay_s=s.signal_delay_s,
        slurm_setup=[*s.setup, f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"],
        # One failed task ends the step instead of leaving the others blocked in a collective.
        slurm_srun_args=["--kill-on-bad-exit=1"],
        # Slurm requeues the job itself after a node failure; it resumes from the last checkpoint.
        slurm_additional_parameters={"requeue": True},
    )
    return params


def build_job_spec(cfg: Config, *, cluster: Cluster = "slurm", config_file: str | None = None,
                   workdir: str | None = None, trainer_command: Sequence[str] | None = None) -> JobSpec:
    """Resolve the job of ``cfg`` (whose ``slurm`` section already holds the command-line flags)."""
    s = cfg.slurm
    if cluster == "local" and s.nodes != 1:
        raise ConfigError(f"the local executor runs on this machine only: slurm.nodes must be 1, got {s.nodes}")
    world_size = s.world_size
    layout = resolve_layout(cfg, world_size)
    run_dir = Path(cfg.run.dir).resolve()
    shown = ""
    if config_file is None:
        config_file = str(run_dir / "slurm" / f"config-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.yaml")
        shown = str(run_dir / "slurm" / "config-<submission time>.yaml")
    job = TrainingJob(
        config_file=str(Path(config_file).resolve()), run_dir=str(run_dir), max_steps=cfg.train.max_steps,
        workdir=str(Path(workdir or os.getcwd()).resolve()),
        default_env=s.task_defaults(), explicit_env=s.task_overrides(),
        max_requeues=s.max_requeues, stop_timeout_s=float(s.stop_timeout_s),
        **({"trainer_command": tuple(trainer_command)} if trainer_command is not None else {}))
    return JobSpec(cluster=cluster, folder=str(run_dir / "slurm" / "%j"), executor_parameters=executor_parameters(cfg),
                   max_num_timeout=s.max_requeues, nodes=s.nodes, tasks_per_node=s.gpus_per_node,
                   world_size=world_size, layout=layout, job=job, warnings=tuple(data_problems(cfg)),
                   config_file_shown=shown)


def submit_job(cfg: Config, spec: JobSpec):
    """Write the resolved config and submit; returns the ``submitit.Job``.

    Raises ``ConfigError`` for missing input files and ``RuntimeError`` when the cluster is not
    reachable (no ``srun`` for ``cluster='slurm'``).
    """
    import submitit

    if spec.warnings:
        raise ConfigError("; ".join(spec.warnings))
    executor = submitit.AutoExecutor(folder=spec.folder, cluster=spec.cluster,
                                     slurm_max_num_timeout=spec.max_num_timeout,
                                     local_max_num_timeout=spec.max_num_timeout)
    executor.update_parameters(**spec.executor_parameters)
    save_config(cfg, spec.job.config_file)
    return executor.submit(spec.job)


# ------------------------------------------------------------------------------------------ CLI
_FLAG_TO_KEY = {"nodes": "nodes", "gpus_per_node": "gpus_per_node", "partition": "partition", "account": "account",
                "qos": "qos", "time": "time_min", "constraint": "constraint", "exclusive": "exclusive",
                "job_name": "job_name"}


CONFIG_ONLY_KEYS = {
    "slurm.env": "environment of every task, {NAME: value}; null drops a default",
    "slurm.setup": "shell lines run before the tasks start (module load ..., source venv/bin/activate)",
    "slurm.mem_gb": "memory per node in GB (0: Slurm's default)",
    "slurm.cpus_per_task": "CPU cores per task, i.e. per GPU (0: Slurm's default)",
    "slurm.signal_delay_s": "seconds before the time limit at which the job is told to save and requeue",
    "slurm.stop_timeout_s": "seconds a task waits for the trainer to save before it is killed",
    "slurm.max_requeues": "requeues (time-outs and preemptions) after which the job stops",
}
"""Keys of the ``slurm`` section that have no flag; ``--help`` lists them so that nobody has to read
the schema to find out how to set the tasks' environment or memory."""

EPILOG = ("settings without a flag (the config's slurm: section, or slurm.KEY=VALUE overrides):\n"
          + "".join(f"  {key:<22}{text}\n" for key, text in CONFIG_ONLY_KEYS.items())
          + "example:\n  python launchers/slurm.py --nodes 8 configs/1b.yaml 'slurm.env={NCCL_DEBUG: INFO}' "
            "slurm.mem_gb=480 \\\n      'slurm.setup=[module load cuda, source venv/bin/activate]'")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python launchers/slurm.py",
        description="Submit a training run to Slurm (one task per GPU, requeue on time-out and preemption). "
                    "Flags override the config's slurm section.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, help="nodes (slurm.nodes)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs and tasks per node (slurm.gpus_per_node)")
    parser.add_argument("--partition", help="Slurm partition (slurm.partition)")
    parser.add_argument("--account", help="Slurm account (slurm.account)")
    parser.add_argument("--qos", help="Slurm QOS (slurm.qos)")
    parser.add_argument("--time", type=int, metavar="MIN", help="time limit per allocation in minutes (slurm.time_min)")
    parser.add_argument("--constraint", help="node feature constraint (slurm.constraint)")
    parser.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None,
                        help="whole nodes (slurm.exclusive)")
    parser.add_argument("--job-name", help="job name (slurm.job_name)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved job as JSON; submit and write nothing")
    parser.add_argument("--local", action="store_true",
                        help="run the job on this machine through submitit's local executor (one node)")
    parser.add_argument("config", help="YAML config file, e.g. configs/1b.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides applied after the file")
    return parser.parse_intermixed_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    """The config file, overrides, then the command-line flags in the ``slurm`` section."""
    cfg = load_config(args.config, args.overrides)
    flags = {key: getattr(args, flag) for flag, key in _FLAG_TO_KEY.items() if getattr(args, flag) is not None}
    cfg.slurm = dataclasses.replace(cfg.slurm, **flags).validate()
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 submitted (or printed), 2 bad configuration or no cluster to submit to."""
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
        spec = build_job_spec(cfg, cluster="local" if args.local else "slurm")
        if args.dry_run:
            print(json.dumps(spec.describe(), indent=2))
            return 0
        job = submit_job(cfg, spec)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if "srun" not in str(err):
            raise
        print("error: Slurm is not available on this machine (no srun on PATH); use --dry-run to inspect the "
              "job or --local to run it here", file=sys.stderr)
        return 2
    print(f"submitted job {job.job_id}: {spec.nodes} node(s) x {spec.tasks_per_node} task(s), world size "
          f"{spec.world_size}; logs in {spec.folder.replace('%j', str(job.job_id))}")
    return 0
