"""Trainer: configuration errors, bad input, non-finite losses, exact resume, checkpoints."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lomdm_dist.config import ConfigError, load_config
from lomdm_dist.train import checkpoint as ckpt_lib
from lomdm_dist.train.trainer import Trainer, TrainingError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> str:
    """Shards of the bundled Wikipedia excerpt, built once for the whole session."""
    return str(tmp_path_factory.mktemp("corpus_cache"))


def tiny_overrides(run_dir, cache, **extra) -> list[str]:
    values = {
        "run.dir": str(run_dir), "data.cache_dir": cache, "data.seq_len": 32, "data.batch_size": 4,
        "data.eval_batch_size": 8, "data.val_docs": 4, "model.n_layers": 1, "model.d_model": 32,
        "model.n_heads": 2, "model.cond_dim": 32, "model.dropout": 0.1, "optim.warmup_steps": 2,
        "optim.lr": 1e-3, "train.max_steps": 6, "train.log_every": 1, "train.eval_every": 1000,
        "train.ckpt_every": 1000, "train.progress": False, "eval.max_batches": 1, "sample.num": 1,
        "sample.steps": 4, "sample.every_eval": False, "train.ema_decay": 0.9,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def run_cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lomdm_dist.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


# ------------------------------------------------------------------------------------------ config
def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'train.max_stepz'"):
        load_config(ROOT / "configs/smoke.yaml", ["train.max_stepz=3"])


def test_c1_not_above_c2_is_rejected():
    with pytest.raises(ConfigError, match=r"diffusion.c1 \(0.5\) must be greater than diffusion.c2"):
        load_config(ROOT / "configs/smoke.yaml", ["diffusion.c1=0.5", "diffusion.c2=0.5"])


def test_invalid_values_name_the_key():
    with pytest.raises(ConfigError, match="diffusion.scheduler must be one of"):
        load_config(None, ["diffusion.scheduler=linear"])
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        load_config(None, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="diffusion.block_size"):
        load_config(None, ["diffusion.scheduler=block", "diffusion.block_size=5", "data.seq_len=64"])


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs/smoke.yaml", ["train.max_steps=7", "optim.betas=[0.9, 0.98]"])
    assert cfg.train.max_steps == 7 and cfg.optim.betas == (0.9, 0.98) and isinstance(cfg.optim.lr, float)


def test_cli_config_error_is_one_line_without_traceback(tmp_path):
    result = run_cli("configs/smoke.yaml", "model.dropoutt=0.2", f"run.dir={tmp_path}")
    assert result.returncode == 2
    assert "unknown config key 'model.dropoutt'" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_missing_corpus_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-dump.xml.bz2"
    result = run_cli("configs/smoke.yaml", f"run.dir={tmp_path / 'run'}", f"data.path={missing}",
                     f"data.cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 2, result.stderr
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------ training
def test_resume_gives_identical_losses(tmp_path, corpus_cache):
    """2N steps in one run == N steps, stop, N more from the checkpoint (dropout on, so RNG state matters)."""
    straight = tmp_path / "straight"
    Trainer(load_config(None, tiny_overrides(straight, corpus_cache))).run()
    split = tmp_path / "split"
    Trainer(load_config(None, tiny_overrides(split, corpus_cache, **{"train.max_steps": 3, "train.ckpt_every": 3}))).run()
    assert ckpt_lib.latest_checkpoint(split).name == "step-00000003"
    resumed = Trainer(load_config(None, tiny_overrides(split, corpus_cache)))
    assert resumed.step == 3
    resumed.run()
    a = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(straight) if "loss" in m]
    b = [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(split) if "loss" in m]
    assert [s for s, _, _ in a] == list(range(1, 7))
    assert a == b
    final_a = ckpt_lib.load_checkpoint(straight)["model"]
    final_b = ckpt_lib.load_checkpoint(split)["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_nonfinite_losses_are_skipped_and_counted(tmp_path, corpus_cache, monkeypatch):
    original = Trainer.compute_loss
    poisoned_steps = {2, 4}

    def compute_loss(self, x):
        out = original(self, x)
        if self.step in poisoned_steps:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)
    trainer = Trainer(load_config(None, tiny_overrides(tmp_path / "run", corpus_cache)))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.run()
    assert result.nonfinite_skipped == 2 and result.step == 6
    logged = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 4, 6]  # steps 3 and 5 (0-based 2 and 4) were skipped
    assert logged[-1]["nonfinite_skipped"] == 2
    assert all(math.isfinite(v) for k, v in trainer.model.state_dict().items() for v in [v.float().sum().item()])
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_repeated_nonfinite_losses_stop_with_the_step(tmp_path, corpus_cache, monkeypatch):
    original = Trainer.compute_loss

    def compute_loss(self, x):
        out = original(self, x)
        if self.step >= 1:
            out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)
    trainer = Trainer(load_config(None, tiny_overrides(tmp_path / "run", corpus_cache,
                                                       **{"train.max_nonfinite_in_row": 3})))
    with pytest.raises(TrainingError, match="3 non-finite losses in a row, the last at step 3"):
        trainer.run()


def test_corrupted_checkpoint_is_a_clear_error(tmp_path, corpus_cache):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(run, corpus_cache, **{"train.max_steps": 2, "train.ckpt_every": 2}))).run()
    ckpt = ckpt_lib.latest_checkpoint(run)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"model.safetensors is corrupt"):
        Trainer(load_config(None, tiny_overrides(run, corpus_cache)))


def test_interrupted_checkpoint_write_is_ignored(tmp_path, corpus_cache):
    """A directory without the COMPLETE marker (a write killed midway) never counts as a checkpoint."""
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(run, corpus_cache, **{"train.max_steps": 2, "train.ckpt_every": 2}))).run()
    fake = ckpt_lib.checkpoint_root(run) / "step-00000009"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"partial")
    assert ckpt_lib.latest_checkpoint(run).name == "step-00000002"
    with pytest.raises(ckpt_lib.CheckpointError, match="incomplete"):
        ckpt_lib.resolve_checkpoint(fake)


def test_keeps_newest_checkpoints(tmp_path, corpus_cache):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(run, corpus_cache, **{"train.ckpt_every": 1,
                                                                   "train.keep_checkpoints": 2}))).run()
    assert [p.name for _, p in ckpt_lib.complete_checkpoints(run)] == ["step-00000005", "step-00000006"]
