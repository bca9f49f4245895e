"""The README's first command, end to end: train configs/smoke.yaml on the real corpus, evaluate,
sample, log to TensorBoard; then sample from the run with tools/sample.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPT2_VOCAB = 50257


@pytest.mark.slow
def test_smoke_config_trains_evaluates_and_samples(tmp_path):
    run_dir = tmp_path / "smoke"
    result = subprocess.run(
        [sys.executable, "launchers/local.py", "configs/smoke.yaml", f"run.dir={run_dir}",
         f"data.cache_dir={tmp_path / 'cache'}", "train.progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == ""                      # console lines and bars share stderr
    assert f"checkpoint:        {run_dir / 'checkpoints' / 'step-00000120'}" in result.stderr

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "val_ppl" in m]
    train = [m for m in metrics if "loss" in m]
    assert len(evals) >= 2
    # An untrained model predicts the uniform distribution: NELBO ~ log V per token, perplexity ~ V.
    assert evals[-1]["val_ppl"] < GPT2_VOCAB / 10, evals
    assert evals[-1]["val_nelbo"] < evals[0]["val_nelbo"] < math.log(GPT2_VOCAB)
    for key in ("step", "loss", "nelbo", "l_main", "l_velocity", "lr", "grad_norm", "tokens_per_sec"):
        assert key in train[-1], key
    assert all(math.isfinite(m["loss"]) for m in train)

    # the resolved config, a complete checkpoint, samples with their unmasking order
    assert (run_dir / "config.yaml").is_file()
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert checkpoints and (checkpoints[-1] / "COMPLETE").is_file()
    assert not list(checkpoints[-1].glob("*.safetensors"))     # the weights are kept once, in state/
    sample_files = sorted((run_dir / "samples").glob("step-*.jsonl"))
    record = json.loads(sample_files[-1].read_text().splitlines()[0])
    assert record["text"] and len(record["tokens"]) == len(record["order"]) == 64

    # TensorBoard events are readable without TensorFlow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"train/loss", "val/ppl", "train/l_velocity", "order/k_phi_mean"} <= set(events.Tags()["scalars"])
    assert {"order/k_phi_per_position", "order/generation_order"} <= set(events.Tags()["images"])

    out = tmp_path / "samples.jsonl"
    sampled = subprocess.run(
        [sys.executable, "tools/sample.py", "--ckpt", str(run_dir), "--num", "3", "--steps", "16", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert isinstance(line["text"], str) and len(line["tokens"]) == 64
        assert all(0 <= step <= 16 for step in line["order"])
        assert all(0 <= token < GPT2_VOCAB for token in line["tokens"])
