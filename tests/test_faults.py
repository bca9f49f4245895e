"""Fault tolerance end to end on CPU: time-out/preemption requeue through submitit's local executor,
SIGKILL at several points (mid-step, mid-checkpoint-write) and a restart, NaN injection.

Every faulty run is compared with one uninterrupted run of the same tiny config: the losses of
every step, the final weights and EMA, and the batch each step consumed (a sha256 per step,
recorded by ``fault_workers/faulty_train.py``) must be identical; dropout is on, so RNG state
matters. ``TASKS`` is the number of training processes per job; the comparisons are per rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from lomdm_dist.config import load_config
from lomdm_dist.launch import build_job_spec, submit_job
from lomdm_dist import checkpoint as ckpt_lib

ROOT = Path(__file__).resolve().parents[1]
FAULTY_TRAIN = ROOT / "tests" / "fault_workers" / "faulty_train.py"
TASKS = 2
MAX_STEPS = 10
JOB_TIMEOUT_S = 240


def tiny_overrides(run_dir: Path, cache: str, **extra) -> list[str]:
    values = {
        "run.dir": str(run_dir), "data.cache_dir": cache, "data.seq_len": 32, "data.batch_size": 4 * TASKS,
        "data.eval_batch_size": 8, "data.val_docs": 4, "model.n_layers": 1, "model.d_model": 32,
        "model.n_heads": 2, "model.cond_dim": 32, "model.dropout": 0.1, "optim.warmup_steps": 2,
        "optim.lr": 1e-3, "train.max_steps": MAX_STEPS, "train.log_every": 1, "train.eval_every": 1000,
        "train.ckpt_every": 3, "train.keep_checkpoints": 2, "train.progress": False, "train.threads": 1,
        "train.ema_decay": 0.9, "eval.max_batches": 1, "sample.every_eval": False,
        "parallel.dp_shard": TASKS, "slurm.nodes": 1, "slurm.gpus_per_node": TASKS, "slurm.time_min": 10,
        "slurm.signal_delay_s": 60, "slurm.stop_timeout_s": 45, "slurm.max_requeues": 3,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def write_config(run_dir: Path, cache: str, **extra) -> Path:
    """A standalone YAML of the tiny config (what the launcher writes at submission)."""
    from lomdm_dist.config import save_config

    path = run_dir.parent / f"{run_dir.name}.yaml"
    save_config(load_config(ROOT / "configs/smoke.yaml", tiny_overrides(run_dir, cache, **extra)), path)
    return path


def faulty_command(record: Path, *faults: str) -> list[str]:
    return [sys.executable, str(FAULTY_TRAIN), "--record", str(record), *faults, "--"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(command: list[str], config: Path) -> list[subprocess.CompletedProcess]:
    """Run ``command CONFIG`` as TASKS processes with torchrun's environment; every rank's result."""
    port = free_port()
    procs = []
    for rank in range(TASKS):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(TASKS), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(TASKS), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        err = tempfile.TemporaryFile("w+")  # a file, not a pipe: no rank can block on a full pipe
        procs.append((subprocess.Popen([*command, str(config)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                       stderr=err, text=True), err))
    results = []
    for proc, err in procs:
        proc.wait(timeout=300)
        err.seek(0)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, "", err.read()))
        err.close()
    return results


# ------------------------------------------------------------------------------------ reading runs
def read_runs(record: Path) -> list[list[tuple[int, int, str]]]:
    """The record split by process start: run k holds every rank's k-th process, as ``(rank, step, sha256)``."""
    starts: dict[int, list[int]] = {}     # rank -> pids in start order
    runs: list[list[tuple[int, int, str]]] = []
    for line in record.read_text().splitlines():
        kind, rank, *rest = line.split()
        if kind == "start":
            starts.setdefault(int(rank), []).append(int(rest[0]))
            continue
        step, digest, pid = rest
        index = starts[int(rank)].index(int(pid))
        runs.extend([] for _ in range(index + 1 - len(runs)))
        runs[index].append((int(rank), int(step), digest))
    return runs


def consumed_timeline(record: Path) -> dict[tuple[int, int], str]:
    """Which batch each (rank, step) of the final model was trained on: later runs redo later steps."""
    timeline: dict[tuple[int, int], str] = {}
    for run in read_runs(record):
        for rank, step, digest in run:
            timeline[(rank, step)] = digest
    return timeline


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["loss"], m["grad_norm"]) for m in map(json.loads, lines) if "loss" in m]


def final_state(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    state = ckpt_lib.load_checkpoint(run_dir)
    assert state["meta"]["step"] == MAX_STEPS
    return {"model": state["model"], "ema": state["ema"]}


def assert_same_run(run_dir: Path, record: Path, reference: dict) -> None:
    assert losses(run_dir) == reference["losses"]
    timeline = consumed_timeline(record)
    assert timeline == reference["timeline"], "the samples consumed differ from the uninterrupted run's"
    got = final_state(run_dir)
    for part in ("model", "ema"):
        ref = reference["state"][part]
        assert got[part].keys() == ref.keys()
        unequal = [k for k in ref if not torch.equal(got[part][k], ref[k])]
        assert not unequal, f"{part} tensors differ from the uninterrupted run: {unequal[:5]}"


def wait_for(job, timeout_s: float = JOB_TIMEOUT_S):
    """``job.result()`` with a deadline (the local executor would otherwise wait for its own timeout)."""
    deadline = time.monotonic() + timeout_s
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel()
            pytest.fail(f"job did not finish in {timeout_s} s; log:\n{Path(job.paths.stderr).read_text()[-4000:]}")
        time.sleep(0.2)
    return job


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory) -> str:
    """Shards of the bundled excerpt, built by the first run and reused by all others."""
    return str(tmp_path_factory.getbasetemp() / "fault_corpus_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_cache) -> dict:
    """The uninterrupted run every faulty run must reproduce exactly."""
    base = tmp_path_factory.mktemp("reference")
    run_dir, record = base / "run", base / "samples.txt"
    for result in run_ranks(faulty_command(record), write_config(run_dir, corpus_cache)):
        assert result.returncode == 0, result.stderr[-4000:]
    timeline = consumed_timeline(record)
    assert sorted(timeline) == [(r, s) for r in range(TASKS) for s in range(MAX_STEPS)]
    assert len(set(timeline.values())) == len(timeline), "every step should see a different batch"
    return {"losses": losses(run_dir), "timeline": timeline, "state": final_state(run_dir)}


@pytest.fixture
def local_job_env(monkeypatch):
    """Tasks of the local executor unpickle the job: they need the repository on their path."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))


def submit_local(run_dir: Path, cache: str, command: list[str], **extra):
    cfg = load_config(ROOT / "configs/smoke.yaml", tiny_overrides(run_dir, cache, **extra))
    spec = build_job_spec(cfg, cluster="local", workdir=str(ROOT), trainer_command=command)
    return submit_job(cfg, spec)


# ------------------------------------------------------------------------------------ time-out signal
def test_timeout_signal_requeues_and_finishes_like_an_uninterrupted_run(tmp_path, corpus_cache, reference,
                                                                       local_job_env):
    """Slurm's time-out signal (USR2) reaches the task during step 3: the trainer saves at the next
    step boundary, submitit requeues, the requeued job resumes and ends exactly like the reference."""
    run_dir, record = tmp_path / "run", tmp_path / "samples.txt"
    job = wait_for(submit_local(run_dir, corpus_cache, faulty_command(record, "--signal-parent-at-step", "3")))
    outcomes = job.results()
    assert [(o.status, o.requeues, o.step) for o in outcomes] == [("completed", 1, MAX_STEPS)] * TASKS
    runs = read_runs(record)
    assert len(runs) == 2, "expected one requeue"
    resumed_at = runs[1][0][1]
    assert 3 < resumed_at < MAX_STEPS, f"the interrupted run should stop after step 3, it resumed at {resumed_at}"
    for rank in range(TASKS):  # every rank resumes at the same step and runs to the end once
        assert [step for r, step, _ in runs[1] if r == rank] == list(range(resumed_at, MAX_STEPS)), rank
    assert_same_run(run_dir, record, reference)
    log = Path(job.paths.stderr).read_text()
    assert "requeueing (1 of at most 3)" in log and f"step-{resumed_at:08d}" in log


def test_requeue_cap_stops_the_job_after_saving(tmp_path, corpus_cache, local_job_env):
    """With slurm.max_requeues = 0 the signal still produces a complete checkpoint, then the job fails
    with a message naming the key instead of requeueing."""
    run_dir, record = tmp_path / "run", tmp_path / "samples.txt"
    job = wait_for(submit_local(run_dir, corpus_cache, faulty_command(record, "--signal-parent-at-step", "3"),
                                **{"slurm.max_requeues": 0}))
    with pytest.raises(Exception, match=r"slurm.max_requeues \(0\) reached"):
        job.results()
    assert len(read_runs(record)) == 1
    saved = ckpt_lib.complete_checkpoints(run_dir)[-1][0]
    assert 3 < saved < MAX_STEPS
    ckpt_lib.verify_checkpoint(ckpt_lib.latest_checkpoint(run_dir))


# ---------------------------------------------------------------------------------------- SIGKILL
def test_sigkill_at_several_points_then_restart_loses_nothing(tmp_path, corpus_cache, reference, local_job_env):
    """Kills (checkpoints every 3 steps, 2 kept), each followed by a restart of the same command:

    1. mid-step 4, in a Slurm task: the job fails naming the rank and the signal;
    2. while writing the checkpoint of step 6, after its first file;
    3. while writing it again, after the COMPLETE marker but before the rename;
    4. after the checkpoint of step 9 is renamed into place, before old ones are pruned;
    then a final restart finishes. Each restart resumes from the newest complete checkpoint.
    """
    run_dir, record = tmp_path / "run", tmp_path / "samples.txt"
    job = wait_for(submit_local(run_dir, corpus_cache, faulty_command(record, "--kill-at-step", "4")))
    with pytest.raises(Exception, match=r"rank 0 on .*the trainer ended with signal SIGKILL"):
        job.results()
    assert [s for s, _ in ckpt_lib.complete_checkpoints(run_dir)] == [3]

    config = write_config(run_dir, corpus_cache)
    # the checkpoint directory's own files are trainer.pt, config.yaml and meta.json: the 4th fsync is the marker's
    stages = [(["--kill-in-save", "6:1"], [3]), (["--kill-in-save", "6:4"], [3]),
              (["--kill-after-rename", "9"], [3, 6, 9]), ([], [9, 10])]
    for faults, checkpoints_after in stages:
        results = run_ranks(faulty_command(record, *faults), config)
        codes = [r.returncode for r in results]
        if faults:  # the killed rank dies by SIGKILL; a peer fails its next collective (exit 1) instead of hanging
            assert -signal.SIGKILL in codes and set(codes) <= {-signal.SIGKILL, 1}, \
                f"{faults}: {codes} {results[0].stderr[-2000:]}"
        else:
            assert codes == [0] * TASKS, f"{codes}: {results[0].stderr[-3000:]}"
        assert [s for s, _ in ckpt_lib.complete_checkpoints(run_dir)] == checkpoints_after, faults
    resumed_from = [run[0][1] for run in read_runs(record)[1:]]
    assert resumed_from == [3, 3, 3, 9], "each restart must resume from the newest complete checkpoint"
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "stale partial checkpoints are cleaned up"
    assert_same_run(run_dir, record, reference)


# --------------------------------------------------------------------------------------- NaN / Inf
def test_nan_losses_through_the_cli_are_skipped_and_counted(tmp_path, corpus_cache):
    run_dir, record = tmp_path / "run", tmp_path / "samples.txt"
    result = run_ranks(faulty_command(record, "--nan-at-steps", "2,5"), write_config(run_dir, corpus_cache))[0]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2: non-finite loss, update skipped (1 in a row, 1 in total)" in result.stderr
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in logged if "loss" in m]
    assert [m["step"] for m in trained] == [s for s in range(1, MAX_STEPS + 1) if s not in (3, 6)]
    assert trained[-1]["nonfinite_skipped"] == 2
    final = ckpt_lib.load_checkpoint(run_dir)
    assert all(torch.isfinite(t).all() for t in final["model"].values())
    assert final["trainer"]["nonfinite_total"] == 2


def test_repeated_nan_losses_stop_the_cli_with_the_step(tmp_path, corpus_cache):
    run_dir, record = tmp_path / "run", tmp_path / "samples.txt"
    result = run_ranks(faulty_command(record, "--inf-from-step", "1"),
                       write_config(run_dir, corpus_cache, **{"train.max_nonfinite_in_row": 3}))[0]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "training stopped: 3 non-finite losses in a row, the last at step 3" in result.stderr
    assert "Traceback" not in result.stderr
