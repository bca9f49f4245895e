"""The benchmark tools run end to end at tiny sizes and print what docs/benchmarks.md records.

Timings are not checked (tests check correctness, not speed); these make sure the tools keep
working as the code under them changes, including the layout-aware step benchmark on 2 processes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.cond_dim=32", "data.seq_len=16",
        "data.batch_size=4"]


def run_tool(*args, timeout=300) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_step_reports_the_ratio():
    out = run_tool("tools/bench_step.py", "configs/smoke.yaml", *TINY, "--iters", "2", "--warmup", "1",
                   "--vocab", "101")
    ratio = re.search(r"ratio LoMDM / MDLM step time at equal masked rows: ([0-9.]+)", out)
    assert ratio and float(ratio.group(1)) > 0


@pytest.mark.dist
def test_bench_step_runs_a_tensor_parallel_layout():
    out = run_tool("tools/bench_step.py", "--nproc", "2", "configs/smoke.yaml", *TINY, "parallel.tp=2",
                   "--iters", "1", "--warmup", "1", "--vocab", "101")
    assert "tp 2" in out and "tok/s/dev" in out


def test_bench_kernels_runs_the_references():
    out = run_tool("tools/bench_kernels.py", "--tokens", "16", "--vocab", "257", "--rows", "2", "--seq", "32",
                   "--iters", "2", "--no-compile")
    assert "velocity_loss" in out and "lomdm_schedule" in out and "eager reference" in out


def test_bench_data_measures_builder_and_reader(tmp_path):
    out = run_tool("tools/bench_data.py", "--text-mb", "0.2", "--seq-len", "64", "--workers", "1",
                   "--reader-seconds", "0.5", "--dir", str(tmp_path))
    assert "builder, jsonl" in out and "reader ShardStream" in out
