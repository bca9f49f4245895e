"""Launch multi-process gloo workers for the distributed-engine tests and read their results; the
tiny trainer config the multi-process trainer and launcher tests share (``tiny_overrides``).

Workers are scripts under ``tests/parallel_workers/`` started with the torchrun environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Each rank writes its results to
``<out>/rank<r>.pt``; tests judge from those files, not from exit codes alone (gloo occasionally
aborts a child at exit after all work is done).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "parallel_workers"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(script: str, nproc: int, out_dir: Path, *args: str, timeout: float = 240.0) -> list[dict]:
    """Run ``parallel_workers/<script>`` on ``nproc`` ranks; return each rank's result dict.

    Fails with every rank's output when a rank wrote no result file.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("rank*.pt"):
        stale.unlink()
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        log = open(out_dir / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKERS / script), str(out_dir), *args],
                                       env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    results = []
    for rank in range(nproc):
        path = out_dir / f"rank{rank}.pt"
        if not path.is_file():
            logs = "\n".join(f"--- rank {r} ---\n" + (out_dir / f"rank{r}.log").read_text()[-4000:]
                             for r in range(nproc))
            raise AssertionError(f"rank {rank} wrote no result file {path}\n{logs}")
        results.append(torch.load(path, weights_only=False))
    return results


def tiny_overrides(run_dir: Path, cache: str, **extra) -> list[str]:
    """Overrides of ``configs/smoke.yaml`` for a trainer run of a few seconds on the bundled corpus:
    2 x 32 model with 2 heads (tp=2 divides it), dropout 0, global batch 4 of 32 tokens, six steps,
    evaluation (with samples) and a checkpoint every three."""
    values = {
        "run.dir": str(run_dir), "data.cache_dir": cache, "data.seq_len": 32, "data.batch_size": 4,
        "data.eval_batch_size": 8, "data.val_docs": 4, "model.n_layers": 2, "model.d_model": 32,
        "model.n_heads": 2, "model.cond_dim": 32, "model.dropout": 0.0, "optim.warmup_steps": 2,
        "optim.lr": 0.001, "train.max_steps": 6, "train.log_every": 1, "train.eval_every": 3,
        "train.ckpt_every": 3, "train.progress": False, "train.threads": 1, "train.ema_decay": 0.9,
        "eval.max_batches": 2, "sample.num": 1, "sample.steps": 4, "sample.every_eval": True,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
