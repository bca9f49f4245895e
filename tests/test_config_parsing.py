"""Reading configs: numbers in scientific notation, string keys that look like numbers, and the
``parallel.microbatches`` default that follows the pipeline layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lomdm_dist.config import ConfigError, load_config, parse_override, save_config
from lomdm_dist.parallel.layout import parallel_section, validate_layout
from lomdm_dist.train.__main__ import load_run_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def test_scientific_notation_is_a_number_in_files_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  eps: 1E-10\n  betas: [0.9, 9.5e-1]\ndiffusion:\n  t_eps: 2e-4\n"
                    "train:\n  ema_decay: .999\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.eps, cfg.optim.betas) == (1e-3, 1e-10, (0.9, 0.95))
    assert (cfg.diffusion.t_eps, cfg.train.ema_decay) == (2e-4, 0.999)

    cfg = load_config(SMOKE, ["optim.lr=5e-4", "optim.betas=[9e-1, 0.99]", "optim.scheduler_lr=+1e-5",
                              "optim.weight_decay=1.0e1"])
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.scheduler_lr, cfg.optim.weight_decay) == \
        (5e-4, (0.9, 0.99), 1e-5, 10.0)
    assert type(cfg.optim.lr) is float and all(type(b) is float for b in cfg.optim.betas)
    assert parse_override("optim.lr=3e-4") == ("optim.lr", 3e-4)
    assert load_run_config(str(SMOKE), ["optim.lr=1e-3"], 1).optim.lr == 1e-3   # the command-line path


def test_integers_and_strings_keep_their_meaning(tmp_path):
    cfg = load_config(SMOKE, ["train.max_steps=10", "run.name=1e-3", "slurm.qos=1.10", "data.tokenizer=gpt2"])
    assert cfg.train.max_steps == 10 and type(cfg.train.max_steps) is int
    assert (cfg.run.name, cfg.slurm.qos) == ("1e-3", "1.10")        # as written, not '0.001' / '1.1'
    cfg = load_config(None, ["slurm.env={NCCL_BUFFSIZE: 4e6}"])
    assert cfg.slurm.env["NCCL_BUFFSIZE"] == "4000000.0"            # an untyped value: the number YAML read
    cfg = load_config(SMOKE, ["train.max_steps=1e3", "data.batch_size=1.6e1"])   # exponent form, whole value
    assert (cfg.train.max_steps, cfg.data.batch_size) == (1000, 16) and type(cfg.train.max_steps) is int
    with pytest.raises(ConfigError, match=r"^train.max_steps must be an integer, got 1000.0$"):
        load_config(SMOKE, ["train.max_steps=1000.0"])
    with pytest.raises(ConfigError, match=r"^train.max_steps must be an integer, got 1.5$"):
        load_config(SMOKE, ["train.max_steps=1.5e0"])
    with pytest.raises(ConfigError, match=r"^train.max_steps must be an integer, got 0.001$"):
        load_config(SMOKE, ["train.max_steps=1e-3"])
    with pytest.raises(ConfigError, match=r"^optim.lr must be a number, got '1e-3x'$"):
        load_config(SMOKE, ["optim.lr=1e-3x"])


@pytest.mark.parametrize("written", [".nan", ".NaN", ".inf", "-.Inf", "1e400"])
def test_non_finite_floats_are_rejected_naming_the_key(tmp_path, written):
    """Range checks such as ``lr <= 0`` are False for NaN, so NaN would pass them: refuse it (and
    infinities, also 1e400, which overflows to inf) wherever a float key is read."""
    with pytest.raises(ConfigError, match=rf"^optim.weight_decay must be a finite number, got '{re.escape(written)}'$"):
        load_config(SMOKE, [f"optim.weight_decay={written}"])
    path = tmp_path / "c.yaml"
    path.write_text(f"optim:\n  betas: [0.9, {written}]\n")
    with pytest.raises(ConfigError, match=r"^optim.betas\[1\] must be a finite number"):
        load_config(path)


def test_saved_config_reads_back_equal(tmp_path):
    cfg = load_config(SMOKE, ["optim.lr=1e-5", "optim.eps=1e-12", "run.name=1e3", "diffusion.k_min=1e-4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_pipeline_size_alone_is_a_complete_layout():
    cfg = load_config(SMOKE, ["parallel.pp=2"])
    assert cfg.parallel.microbatches == 0                           # the config keeps 'automatic'
    assert validate_layout(cfg, 2).microbatches == 2
    assert parallel_section(cfg).microbatches == 2                  # what parallelize_model hands the pipeline
    assert load_run_config(str(SMOKE), ["parallel.pp=2"], 2) is not None
    deep = load_config(SMOKE, ["parallel.pp=4", "model.n_layers=4"])
    assert validate_layout(deep, 4).microbatches == 4
    interleaved = load_config(SMOKE, ["parallel.pp=2", "parallel.pipeline_schedule=interleaved_1f1b",
                                      "parallel.virtual_stages=2", "model.n_layers=4"])
    assert validate_layout(interleaved, 2).microbatches == 2
    explicit = load_config(SMOKE, ["parallel.pp=2", "parallel.microbatches=4"])
    assert validate_layout(explicit, 2) is explicit.parallel        # an explicit count is used as given
    plain = load_config(SMOKE).parallel                            # no pipeline: nothing to resolve
    assert validate_layout(load_config(SMOKE), 1) == plain and plain.resolved_microbatches() == 1


def test_parallelize_model_gets_the_resolved_section():
    import torch

    from lomdm_dist.model import build_model
    from lomdm_dist.parallel import parallelize_model

    cfg = load_config(SMOKE, ["parallel.pp=2", "model.d_model=16", "model.n_heads=2", "model.cond_dim=16"])
    torch.manual_seed(0)
    pm = parallelize_model(build_model(cfg.model, cfg.diffusion, 32), None, cfg)
    assert pm.parallel.microbatches == 2


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pp=2", "parallel.microbatches=1"],
     r"^parallel.microbatches \(1\) must be >= parallel.pp \(2\) for the 1f1b schedule"),
    (["parallel.pp=2", "parallel.microbatches=-1"], r"^parallel.microbatches must be a positive integer or 0"),
    (["parallel.pp=3", "model.n_layers=3"],
     r"^data.batch_size \(8\) must be divisible by .* parallel.microbatches \(automatic: parallel.pp\) = 3$"),
])
def test_bad_microbatch_counts_name_the_key(overrides, message, capsys):
    world = 3 if "parallel.pp=3" in overrides else 2
    with pytest.raises(ConfigError, match=message):
        validate_layout(load_config(SMOKE, overrides), world)
    assert load_run_config(str(SMOKE), overrides, world) is None
    err = capsys.readouterr().err
    assert err.startswith("config error: parallel.microbatches") or err.startswith("config error: data.batch_size")
    assert err.count("\n") == 1
