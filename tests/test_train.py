"""Trainer: configuration errors, bad input, non-finite losses, exact resume, checkpoints, resuming
with a changed config, what a finished run prints and leaves behind (console, TensorBoard, weights)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lomdm_dist.config import ConfigError, load_config
from lomdm_dist import checkpoint as ckpt_lib
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


def test_weights_only_resume_warms_the_learning_rate_up_again(tmp_path, corpus_cache):
    """A converted checkpoint (weights, no optimizer state) resumes with fresh AdamW moments, whose
    first updates are about lr in size for every weight, so the warm-up restarts at its step; a
    normal resume continues the schedule where it was."""
    from lomdm_dist.convert import read_sharded, write_sharded

    warmup, lr = 4, 1e-3
    base = {"optim.warmup_steps": warmup, "train.ckpt_every": 3, "train.max_steps": 3}
    trained = tmp_path / "trained"
    Trainer(load_config(None, tiny_overrides(trained, corpus_cache, **base))).run()
    converted = tmp_path / "converted"
    write_sharded(read_sharded(trained, weights="raw"), converted)
    for run_dir in (trained, converted):
        Trainer(load_config(None, tiny_overrides(run_dir, corpus_cache, **{**base, "train.max_steps": 6}))).run()
    def lrs(run_dir):
        return {m["step"]: m["lr"] for m in read_metrics(run_dir) if "lr" in m}
    # metrics' step s is the update made at trainer step s - 1: factor min(1, (k + 1) / warmup), k
    # counted from the warm-up's start (0 for the normal run, 3 for the converted one)
    assert [lrs(trained)[s] for s in (4, 5, 6)] == pytest.approx([lr, lr, lr], rel=1e-12)
    assert [lrs(converted)[s] for s in (4, 5, 6)] == pytest.approx([lr / 4, 2 * lr / 4, 3 * lr / 4], rel=1e-12)
    # and the restarted schedule is itself saved: a second resume keeps counting from step 3
    Trainer(load_config(None, tiny_overrides(converted, corpus_cache, **{**base, "train.max_steps": 8}))).run()
    assert [lrs(converted)[s] for s in (7, 8)] == pytest.approx([lr, lr], rel=1e-12)


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
    shard = next((ckpt / "state").glob("*.distcp"))          # the weights' only copy
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ckpt_lib.CheckpointError, match=rf"state/{shard.name} is corrupt"):
        Trainer(load_config(None, tiny_overrides(run, corpus_cache)))
    with pytest.raises(ckpt_lib.CheckpointError, match="is corrupt"):
        ckpt_lib.export_safetensors(run)                          # nothing is exported from a damaged checkpoint


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


# ------------------------------------------------------------------------------------------ a finished run
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus_cache):
    """One short run with the progress bar on, an evaluation mid-run and at the end, samples and a
    final checkpoint; its console output captured (stdout and stderr apart)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    cfg = load_config(None, tiny_overrides(run, corpus_cache, **{
        "train.max_steps": 3, "train.eval_every": 2, "train.progress": True, "sample.every_eval": True}))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        trainer = Trainer(cfg)
        result = trainer.run()
    return {"run": run, "trainer": trainer, "result": result, "stdout": out.getvalue(), "stderr": err.getvalue()}


def test_end_of_run_names_each_phase_and_summarises_on_stderr(finished_run):
    run, err = finished_run["run"], finished_run["stderr"]
    assert finished_run["stdout"] == ""                         # one stream: the bars' and the lines'
    final_ckpt = run / "checkpoints" / "step-00000003"
    lines = [line.strip() for line in err.replace("\r", "\n").splitlines()]
    expected = ["evaluating (1 validation batch) ...", "step 3: val_nelbo",
                "sampling (1 samples of 4 steps and generation-order images) ...",
                "writing checkpoint step-00000003 ...", "run completed at step 3 (3 steps this session) in"]
    where = [next((i for i, line in enumerate(lines) if line.startswith(text)), None) for text in expected]
    assert None not in where and where == sorted(where), (where, err[-3000:])
    summary = err[err.index("run completed at step 3"):]
    assert "training" in summary and "evaluation" in summary and "sampling" in summary
    result = finished_run["result"]
    assert f"val_nelbo {result.last_eval['val_nelbo']:.4f}" in summary
    for path in (final_ckpt, run / "samples" / "step-00000003.jsonl", run / "tensorboard", run / "metrics.jsonl"):
        assert str(path) in summary and path.exists(), path
    assert result.checkpoint == final_ckpt and result.samples == run / "samples" / "step-00000003.jsonl"
    assert "step 2: val_nelbo" in err                           # the mid-run evaluation still reports its numbers


def test_tensorboard_tags_are_grouped_and_metrics_jsonl_stays_flat(finished_run):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = finished_run["run"]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert all(tag.split("/", 1)[0] in {"train", "val", "order", "system"} for tag in scalars), scalars
    assert {"train/loss", "train/nelbo", "train/lr", "val/nelbo", "val/ppl", "order/k_phi_mean", "order/k_hat_mean",
            "system/tokens_per_sec", "system/epoch"} <= scalars, scalars
    assert "system/samples_seen" not in scalars
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("system/epoch")] == [1]   # constant: written once, not every step
    for tag in ("order/k_phi_per_position", "order/generation_order"):
        shots = events.Images(tag)
        assert [s.step for s in shots] == [2, 3], tag
        image = Image.open(io.BytesIO(shots[-1].encoded_image_string)).convert("RGB")
        assert image.width >= 300 and image.height >= 150, (tag, image.size)   # drawn, not a 64 x 8 strip
        pixels = torch.from_numpy(np.asarray(image).astype(np.int16))
        assert (pixels[..., 0] != pixels[..., 2]).any(), tag                     # a colour map, not grey
    assert "order/k_phi" in events.Tags()["histograms"]
    train = [m for m in read_metrics(run) if "loss" in m]
    assert {"k_phi_mean", "epoch", "samples_seen", "tokens_per_sec", "lr"} <= set(train[-1])
    assert all("epoch" in m for m in train)


def test_checkpoints_hold_the_weights_once_and_export_on_demand(finished_run, tmp_path):
    from lomdm_dist.checkpoint.export import main as export_main

    run, trainer = finished_run["run"], finished_run["trainer"]
    ckpt = ckpt_lib.latest_checkpoint(run)
    assert not list(ckpt.rglob("*.safetensors"))
    loaded = ckpt_lib.load_checkpoint(run)                      # read from the Distributed Checkpoint shards
    for name, param in trainer.model.named_parameters():
        assert torch.equal(loaded["model"][name], param.detach()), name
        assert torch.equal(loaded["ema"][name], trainer.ema.shadow[name]), name
    assert export_main([str(run), "--out", str(tmp_path / "export")]) == 0
    from safetensors.torch import load_file
    exported = load_file(str(tmp_path / "export" / "ema.safetensors"))
    assert exported.keys() == loaded["ema"].keys()
    assert all(torch.equal(exported[k], loaded["ema"][k]) for k in exported)
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert export_main([str(tmp_path / "no-such-run")]) == 2


def test_export_safetensors_option_adds_the_consolidated_copy(tmp_path, corpus_cache):
    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(run, corpus_cache, **{
        "train.max_steps": 1, "train.export_safetensors": True, "eval.max_batches": 1}))).run()
    from safetensors.torch import load_file
    ckpt = ckpt_lib.latest_checkpoint(run)
    marker = json.loads((ckpt / ckpt_lib.MARKER).read_text())["sha256"]
    loaded = ckpt_lib.load_checkpoint(ckpt)
    for part, name in (("model", "model.safetensors"), ("ema", "ema.safetensors")):
        assert name in marker
        copy = load_file(str(ckpt / name))
        assert copy.keys() == loaded[part].keys() and all(torch.equal(copy[k], loaded[part][k]) for k in copy)


# ------------------------------------------------------------------------------------------ config changes
def test_config_comparison_sorts_changes():
    from lomdm_dist.train.config_history import compare_configs

    old = {"run": {"dir": "a", "allow_config_change": False}, "model": {"d_model": 64, "dropout": 0.1},
           "optim": {"lr": 0.003, "betas": [0.9, 0.999]}, "train": {"max_steps": 10}}
    new = {"run": {"dir": "b", "allow_config_change": True}, "model": {"d_model": 128, "dropout": 0.0},
           "optim": {"lr": 0.003, "betas": [0.9, 0.98]}, "train": {"max_steps": 20, "export_safetensors": False}}
    changes = {c.key: c for c in compare_configs(old, new)}
    assert set(changes) == {"model.d_model", "model.dropout", "optim.betas", "train.max_steps",
                            "train.export_safetensors"}
    assert changes["model.d_model"].reason and "model shape" in changes["model.d_model"].reason
    assert not any(changes[k].reason for k in changes if k != "model.d_model")   # a key new to the schema: a note
    assert changes["optim.betas"].describe() == "optim.betas: [0.9, 0.999] -> [0.9, 0.98]"


def test_resume_with_changed_config_notes_refuses_and_keeps_history(tmp_path, corpus_cache, capfd):
    run = tmp_path / "run"
    base = {"train.max_steps": 2, "train.ckpt_every": 2, "sample.every_eval": False, "eval.max_batches": 1}
    Trainer(load_config(None, tiny_overrides(run, corpus_cache, **base))).run()
    assert len(list((run / "configs").glob("config-00000000-*.yaml"))) == 1
    capfd.readouterr()

    # ordinary changes: printed old -> new, the run goes on, the new config joins the history
    Trainer(load_config(None, tiny_overrides(run, corpus_cache, **{**base, "train.max_steps": 3,
                                                                   "optim.lr": 0.002}))).run()
    err = capfd.readouterr().err
    assert "config changed since the checkpoint at step 2" in err
    assert "train.max_steps: 2 -> 3" in err and "optim.lr: 0.001 -> 0.002" in err
    history = sorted((run / "configs").glob("config-*.yaml"))
    assert [p.name.split("-")[1] for p in history] == ["00000000", "00000002"]
    assert "#   optim.lr: 0.001 -> 0.002" in history[-1].read_text()
    assert load_config(run / "config.yaml").optim.lr == 0.002
    assert load_config(history[0]).optim.lr == 0.001                 # the history files are loadable configs

    # changes the checkpoint cannot continue under: refused, naming the keys and the way out
    changed = {**base, "train.max_steps": 4, "model.d_model": 64, "diffusion.c1": 0.8}
    with pytest.raises(ConfigError) as refused:
        Trainer(load_config(None, tiny_overrides(run, corpus_cache, **changed)))
    message = str(refused.value)
    assert "model.d_model: 32 -> 64" in message and "diffusion.c1: 0.7 -> 0.8" in message
    assert "optim.lr" not in message and "run.allow_config_change=true" in message
    assert len(list((run / "configs").glob("config-*.yaml"))) == 2 and load_config(run / "config.yaml").model.d_model == 32
    cli = run_cli("configs/smoke.yaml", *tiny_overrides(run, corpus_cache, **changed))
    assert cli.returncode == 2 and "model.d_model: 32 -> 64" in cli.stderr and "Traceback" not in cli.stderr

    # ... unless asked: c1 can change (the weights still fit), and the note says it was accepted
    capfd.readouterr()
    Trainer(load_config(None, tiny_overrides(run, corpus_cache, **{**base, "train.max_steps": 4, "optim.lr": 0.002,
                                                                   "diffusion.c1": 0.8,
                                                                   "run.allow_config_change": True}))).run()
    err = capfd.readouterr().err
    assert "diffusion.c1: 0.7 -> 0.8 (accepted because run.allow_config_change=true" in err
    assert ckpt_lib.latest_checkpoint(run).name == "step-00000004"
