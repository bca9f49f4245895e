"""``launchers/local.py``: configuration errors before any process starts, a failing rank, signals;
and ``torchrun -m lomdm_dist.train``, the same program started by torch's own launcher.

The failing rank is ``tests/parallel_workers/failing_train.py`` (the real trainer with one rank
raising at a chosen step); the signal test sends SIGTERM to the launcher of a real two-process
FSDP run and expects every rank to stop at the same step with one complete checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lomdm_dist import checkpoint as ckpt_lib
from dist_utils import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.getbasetemp() / "dist_corpus_cache")


def test_config_error_is_reported_once_before_any_process_starts(tmp_path):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "launchers/local.py", "--nproc", "3", "configs/smoke.yaml",
                             f"run.dir={tmp_path / 'run'}", "parallel.tp=3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error:"), result.stderr
    assert "parallel.tp (3)" in lines[0] and "model.n_heads (4)" in lines[0]
    assert not (tmp_path / "run").exists()           # no rank ever started
    assert time.perf_counter() - start < 10          # no torch import, no spawn

    wrong_world = subprocess.run([sys.executable, "launchers/local.py", "--nproc", "3", "configs/smoke.yaml",
                                  f"run.dir={tmp_path / 'run'}", "parallel.tp=2"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert wrong_world.returncode == 2
    assert wrong_world.stderr.count("config error") == 1 and "number of processes (3)" in wrong_world.stderr


def test_a_failing_rank_brings_the_launcher_down_naming_it(tmp_path, cache):
    env = {**os.environ, "FAIL_RANK": "1", "FAIL_AT_STEP": "1"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "launchers/local.py", "--nproc", "2", "--grace-s", "20", "--script",
                             "tests/parallel_workers/failing_train.py", "configs/smoke.yaml",
                             *tiny_overrides(tmp_path / "run", cache, **{"parallel.tp": 2, "train.max_steps": 50})],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "[launcher] rank 1 failed first (exit code 1): RuntimeError: injected failure at step 1" in result.stderr
    assert "rank 1 of 2 failed: RuntimeError: injected failure at step 1" in result.stderr
    assert time.perf_counter() - start < 60, "the surviving rank should fail in its next collective, not hang"


def test_sigterm_is_forwarded_and_every_rank_saves_at_the_same_step(tmp_path, cache):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, cache, **{"parallel.dp_shard": 2, "train.max_steps": 1000,
                                                  "train.eval_every": 1000, "train.ckpt_every": 1000})
    stderr = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, "launchers/local.py", "--nproc", "2", "configs/smoke.yaml", *overrides],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr.seek(0)
    log = stderr.read()
    assert returncode == 0, log[-3000:]
    assert log.count("received signal 15") == 1        # printed by rank 0 only, but both ranks stopped:
    assert "[launcher] all 2 ranks ended cleanly after SIGTERM" in log
    (step, ckpt), = ckpt_lib.complete_checkpoints(run_dir)
    assert 2 <= step < 1000 and f"stopped by signal at step {step}" in log
    last_logged = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert last_logged == step
    positions = [torch.load(f, weights_only=True)["global_samples"] for f in sorted((ckpt / "data").glob("dp*.pt"))]
    assert positions == [step * 4, step * 4]            # both data-parallel slices stopped after the same step
    ckpt_lib.verify_checkpoint(ckpt)


def torchrun(nproc: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "lomdm_dist.train", "configs/smoke.yaml", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_torchrun_trains_like_one_process(tmp_path, cache):
    """torchrun with a pipeline of two stages and no microbatch count (automatic: two) logs the
    single-process run's losses (float32, 1e-5 relative, as tests/test_train_distributed.py)."""
    from lomdm_dist.config import load_config
    from lomdm_dist.train.trainer import Trainer

    extra = {"train.max_steps": 2, "train.eval_every": 2, "train.ckpt_every": 2, "eval.max_batches": 1,
             "sample.every_eval": False, "optim.lr": "1e-3"}
    single, piped = tmp_path / "single", tmp_path / "torchrun"
    Trainer(load_config(ROOT / "configs/smoke.yaml", tiny_overrides(single, cache, **extra))).run()
    result = torchrun(2, *tiny_overrides(piped, cache, **extra, **{"parallel.pp": 2}))

    def logged(run_dir: Path) -> dict[int, dict]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
        return {m["step"]: m for m in map(json.loads, lines) if "loss" in m}

    # Judged from what the run logged: a rank may abort at exit after all work is done (gloo).
    got, want = logged(piped), logged(single)
    assert sorted(got) == sorted(want) == [1, 2], result.stderr[-4000:]
    for step in (1, 2):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-5), step
    assert "completed at step 2" in result.stdout + result.stderr, result.stderr[-4000:]
    assert ckpt_lib.read_meta(ckpt_lib.latest_checkpoint(piped))["layout"]["pp"] == 2


def test_torchrun_config_error_is_one_line_and_in_the_failure_summary(tmp_path):
    result = torchrun(2, f"run.dir={tmp_path / 'run'}", "parallel.tp=3", timeout=60)
    assert result.returncode != 0
    reports = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
    assert len(reports) == 1 and "parallel.tp (3)" in reports[0], result.stderr[-3000:]   # rank 0 only
    summary = result.stderr[result.stderr.index("Root Cause"):]
    assert "exitcode  : 2" in summary and "ConfigError: parallel.pp (1)" in summary      # torchrun's error file
    assert not (tmp_path / "run").exists()
