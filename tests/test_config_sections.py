"""Every config section checks its own keys; ``Config.validate`` runs each check once and adds the
checks that span two sections. Each bad value is an error of one line that names its key, and the
command line exits with status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lomdm_dist.config import (Config, ConfigError, DataConfig, DiffusionConfig, EvalConfig, ModelConfig,
                               OptimConfig, ParallelConfig, RunConfig, SampleConfig, SlurmConfig, TrainConfig,
                               config_from_yaml, load_config)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"

BAD_SECTIONS = [
    (DataConfig(seq_len=2), "data.seq_len must be at least 3"),
    (DataConfig(batch_size=0), "data.batch_size must be positive"),
    (DataConfig(source="shards"), "data.path must name a shard manifest"),
    (ModelConfig(d_model=30, n_heads=4), r"model.d_model \(30\) must be divisible by model.n_heads \(4\)"),
    (ModelConfig(d_model=12, n_heads=4), "model.d_model / model.n_heads must be even"),
    (ModelConfig(dropout=1.0), r"model.dropout must be in \[0, 1\)"),
    (ModelConfig(head_mlp_hidden=-1), "model.head_mlp_hidden must be >= 0"),
    (ModelConfig(rope_base=0.0), "model.rope_base must be positive"),
    (DiffusionConfig(c1=0.5, c2=0.6), r"diffusion.c1 \(0.5\) must be greater than diffusion.c2"),
    (DiffusionConfig(masks_per_row=3), "diffusion.masks_per_row must be 2 for the lomdm scheduler"),
    (DiffusionConfig(scheduler="poly", c1=0.0), "diffusion.c1 .* must be positive"),
    (DiffusionConfig(scheduler="mdlm", t_eps=1.0), r"diffusion.t_eps must be in \(0, 1\)"),
    (DiffusionConfig(block_size=0), "diffusion.block_size must be positive"),
    (DiffusionConfig(is_power=-0.01), r"diffusion.is_power must be >= 0 .*got -0.01"),   # not read as 0 ("auto")
    (DiffusionConfig(scheduler="mdlm", time_sampling="importance", is_power=-1.0), "diffusion.is_power must be >= 0"),
    (OptimConfig(lr=0.0), "optim.lr must be positive"),
    (OptimConfig(betas=(0.9, 1.0)), r"optim.betas must lie in \[0, 1\)"),
    (TrainConfig(ckpt_every=0), "train.ckpt_every must be positive"),
    (TrainConfig(ema_decay=1.0), r"train.ema_decay must be in \[0, 1\)"),
    (EvalConfig(t_samples=0), "eval.t_samples must be positive"),
    (EvalConfig(max_batches=-1), "eval.max_batches must be >= 0"),
    (SampleConfig(t_min=1.0), r"sample.t_min must be in \[0, 1\)"),
    (SampleConfig(steps=0), "sample.steps must be positive"),
    (ParallelConfig(tp=0), "parallel.tp must be a positive integer"),
    (ParallelConfig(microbatches=-1), "parallel.microbatches must be a positive integer or 0"),
    (ParallelConfig(virtual_stages=2), r"parallel.virtual_stages \(2\) > 1 needs"),
    (ParallelConfig(collective_timeout_s=0.0), "parallel.collective_timeout_s must be positive"),
    (SlurmConfig(nodes=0), "slurm.nodes must be an integer >= 1"),
    (SlurmConfig(stop_timeout_s=200, signal_delay_s=100), r"slurm.stop_timeout_s \(200\) must be less than"),
]


@pytest.mark.parametrize("section, message", BAD_SECTIONS, ids=lambda v: type(v).__name__ if not isinstance(v, str) else "")
def test_each_section_names_its_bad_key(section, message):
    with pytest.raises(ConfigError, match=message) as err:
        section.validate()
    assert "\n" not in str(err.value)
    # Config.validate reaches the same check through the section
    name = {RunConfig: "run", DataConfig: "data", ModelConfig: "model", DiffusionConfig: "diffusion",
            OptimConfig: "optim", TrainConfig: "train", EvalConfig: "eval", SampleConfig: "sample",
            ParallelConfig: "parallel", SlurmConfig: "slurm"}[type(section)]
    with pytest.raises(ConfigError, match=message):
        Config(**{name: section}).validate()


def test_defaults_are_valid_and_validate_returns_the_object():
    cfg = Config()
    assert cfg.validate() is cfg
    for section in (RunConfig(), DataConfig(), ModelConfig(), DiffusionConfig(), OptimConfig(), TrainConfig(),
                    EvalConfig(), SampleConfig(), ParallelConfig(), SlurmConfig()):
        assert section.validate() is section


def test_cross_section_check_needs_both_sections():
    diffusion = DiffusionConfig(scheduler="block", block_size=5)
    assert diffusion.validate() is diffusion                       # on its own the block size is fine
    with pytest.raises(ConfigError, match=r"^diffusion.block_size \(5\) must divide data.seq_len \(128\)$"):
        Config(diffusion=diffusion).validate()


def test_each_section_is_checked_once(monkeypatch):
    calls: dict[str, int] = {}
    for cls in (RunConfig, DataConfig, ModelConfig, DiffusionConfig, OptimConfig, TrainConfig, EvalConfig,
                SampleConfig, ParallelConfig, SlurmConfig):
        original = cls.validate

        def counted(self, _original=original, _name=cls.__name__):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(self)
        monkeypatch.setattr(cls, "validate", counted)
    load_config(SMOKE, ["slurm.nodes=2"])
    assert calls == {name: 1 for name in ("RunConfig", "DataConfig", "ModelConfig", "DiffusionConfig", "OptimConfig",
                                          "TrainConfig", "EvalConfig", "SampleConfig", "ParallelConfig", "SlurmConfig")}


def test_config_from_yaml_text_matches_the_file():
    assert config_from_yaml(SMOKE.read_text(), ["optim.lr=1e-3"]) == load_config(SMOKE, ["optim.lr=1e-3"])
    with pytest.raises(ConfigError, match="^checkpoint config must hold a mapping of sections$"):
        config_from_yaml("- a\n- b\n", source="checkpoint config")


def test_command_line_exits_2_with_one_line_naming_the_key():
    done = subprocess.run([sys.executable, "-m", "lomdm_dist.train", str(SMOKE), "model.head_mlp_hidden=-1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr == "config error: model.head_mlp_hidden must be >= 0, got -1\n"
