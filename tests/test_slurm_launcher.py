"""The Slurm launcher without Slurm: dry runs, flags over the config's ``slurm`` section, layout and
config errors that name their keys, the task environment and the requeue cap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lomdm_dist.config import ConfigError, load_config
from lomdm_dist.config.slurm import DEFAULT_TASK_ENV
from lomdm_dist.launch import RequeueLimitError, TrainingJob, main
from lomdm_dist.launch.job import task_environment

ROOT = Path(__file__).resolve().parents[1]
CONFIG_1B = ROOT / "configs" / "1b.yaml"


def dry_run(capsys, *argv: str) -> dict:
    assert main(["--dry-run", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_dry_run_of_1b_on_8_nodes_from_the_command_line(tmp_path):
    """The issue's command: 64 tasks, 8 per node, world size 64, the layout written in configs/1b.yaml."""
    result = subprocess.run([sys.executable, str(ROOT / "launchers" / "slurm.py"), "--dry-run", "--nodes", "8",
                             str(CONFIG_1B)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert (job["nodes"], job["tasks_per_node"], job["tasks"], job["world_size"]) == (8, 8, 64, 64)
    params = job["executor_parameters"]
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (8, 8, 8)
    written = yaml.safe_load(CONFIG_1B.read_text())["parallel"]
    assert {k: job["layout"][k] for k in written} == written
    assert job["layout"]["tp"] * job["layout"]["pp"] * job["layout"]["dp_shard"] * job["layout"]["dp_replicate"] == 64
    assert job["trainer_command"][-3:-1] == ["-m", "lomdm_dist.train"]
    # The config the tasks train from is written at submission, under a name with that time.
    assert "config_file" not in job
    assert job["trainer_command"][-1] == job["config_written_at_submission"] == \
        str(tmp_path / "runs" / "owt-1b" / "slurm" / "config-<submission time>.yaml")
    assert job["task_command"].endswith(f"-m submitit.core._submit {tmp_path}/runs/owt-1b/slurm/%j")
    assert job["environment"]["defaults_unless_set"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert job["environment"]["per_task"]["WORLD_SIZE"] == "64"
    assert job["requeue"] == {"signal": "SIGUSR2", "signal_delay_s": 300, "stop_timeout_s": 240.0, "max_requeues": 60}
    assert params["slurm_srun_args"] == ["--kill-on-bad-exit=1"]
    assert params["slurm_additional_parameters"] == {"requeue": True}
    assert any("data.path" in w for w in job["warnings"])  # no OWT shards on this machine
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"


def test_1b_config_has_about_a_billion_parameters():
    from lomdm_dist.model import build_model

    cfg = load_config(CONFIG_1B)
    assert cfg.data.path == "data/owt/train/manifest.json" and cfg.train.precision == "bf16"
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.diffusion, 50257 + 1)
    backbone = sum(p.numel() for p in model.backbone.parameters())
    total = sum(p.numel() for p in model.parameters())
    # Closed form of the transformer blocks (qkv, out-proj, 4x MLP = 12 d^2 per block) as a floor.
    d, layers = cfg.model.d_model, cfg.model.n_layers
    assert backbone > 12 * d * d * layers + 2 * 50258 * d
    assert 0.95e9 < backbone < 1.1e9 and total < 1.2e9


def test_flags_override_the_slurm_section(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = dry_run(capsys, "--nodes", "1", "--gpus-per-node", "2", "--partition", "on", "--account", "lab",
                  "--qos", "high", "--time", "30", "--constraint", "h100", "--no-exclusive", "--job-name", "probe",
                  str(CONFIG_1B), "parallel.dp_shard=2", "parallel.dp_replicate=1", "data.eval_batch_size=64",
                  "slurm.partition=ignored", "slurm.signal_delay_s=120", "slurm.stop_timeout_s=100")
    params = job["executor_parameters"]
    assert params["name"] == "probe" and params["timeout_min"] == 30
    assert (params["nodes"], params["tasks_per_node"], job["world_size"]) == (1, 2, 2)
    assert params["slurm_partition"] == "on"  # a string, although YAML would read `on` as true
    assert (params["slurm_account"], params["slurm_qos"], params["slurm_constraint"]) == ("lab", "high", "h100")
    assert "slurm_exclusive" not in params
    assert params["slurm_signal_delay_s"] == 120 and job["requeue"]["stop_timeout_s"] == 100.0


def test_layout_that_does_not_fit_the_allocation_names_the_keys(capsys):
    assert main(["--dry-run", "--nodes", "4", str(CONFIG_1B)]) == 2
    err = capsys.readouterr().err
    assert "slurm.nodes (4) x slurm.gpus_per_node (8) = 32" in err
    assert "parallel.dp_shard (8)" in err and "parallel.dp_replicate (8) = 64" in err
    assert err.count("\n") == 1


def test_layout_is_checked_against_the_model(capsys):
    assert main(["--dry-run", str(CONFIG_1B), "parallel.pp=2", "parallel.dp_shard=4", "parallel.microbatches=2",
                 "model.n_layers=15"]) == 2
    err = capsys.readouterr().err
    assert "parallel.pp" in err and "model.n_layers (15)" in err


@pytest.mark.parametrize("override, message", [
    ("slurm.stop_timeout_s=400", r"slurm.stop_timeout_s \(400\) must be less than slurm.signal_delay_s \(300\)"),
    ("slurm.nodes=0", r"slurm.nodes must be an integer >= 1"),
    ("slurm.max_requeues=-1", r"slurm.max_requeues must be an integer >= 0"),
    ("slurm.env={RANK: 3}", r"slurm.env.RANK cannot be set"),
    ("slurm.env={NCCL_DEBUG: [INFO]}", r"slurm.env.NCCL_DEBUG must be a string, a number or null"),
    ("slurm.env={'1BAD': x}", r"'1BAD' is not a valid environment variable name"),
    ("slurm.time_min=4", r"slurm.signal_delay_s \(300\) must be shorter than slurm.time_min \(4 minutes\)"),
])
def test_bad_slurm_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG_1B, [override])


def test_local_executor_needs_one_node(capsys):
    assert main(["--dry-run", "--local", "--nodes", "8", str(CONFIG_1B)]) == 2
    assert "slurm.nodes must be 1, got 8" in capsys.readouterr().err


def test_submitting_without_slurm_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    monkeypatch.chdir(tmp_path)
    code = main(["--nodes", "1", "--gpus-per-node", "1", str(CONFIG_1B), "parallel.dp_shard=1",
                 "parallel.dp_replicate=1", "data.source=wikipedia_excerpt", "data.path="])
    assert code == 2
    assert "Slurm is not available on this machine (no srun on PATH)" in capsys.readouterr().err
    assert not list(tmp_path.glob("runs/*/slurm/config-*.yaml")), "nothing is written when nothing is submitted"


def test_environment_precedence():
    cfg = load_config(None, ["slurm.env={NCCL_DEBUG: INFO, NCCL_SOCKET_IFNAME: ib0, PYTHONUNBUFFERED: null}"])
    defaults, explicit = cfg.slurm.task_defaults(), cfg.slurm.task_overrides()
    inherited = {"PATH": "/bin", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_SOCKET_IFNAME": "eth0", "RANK": "7"}
    rendezvous = {"RANK": "0", "WORLD_SIZE": "2"}
    env = task_environment(defaults, inherited, explicit, rendezvous)
    assert env == {
        "PATH": "/bin",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",        # the user's own export beats a default
        "TORCH_NCCL_AVOID_RECORD_STREAMS": DEFAULT_TASK_ENV["TORCH_NCCL_AVOID_RECORD_STREAMS"],
        "PYTHONFAULTHANDLER": DEFAULT_TASK_ENV["PYTHONFAULTHANDLER"],
        "NCCL_DEBUG": "INFO",                          # slurm.env replaces the default
        "NCCL_SOCKET_IFNAME": "ib0",                   # and beats the inherited value
        "RANK": "0", "WORLD_SIZE": "2",                # rendezvous always wins
    }                                                  # PYTHONUNBUFFERED: dropped by null


def test_requeue_count_is_capped():
    job = TrainingJob(config_file="/c.yaml", run_dir="/r", max_steps=10, workdir="/", max_requeues=2, requeues=1)
    delayed = job.checkpoint()
    assert delayed.function is not job and delayed.function.requeues == 2 and job.requeues == 1
    assert delayed.function.config_file == "/c.yaml" and delayed.function.max_requeues == 2
    with pytest.raises(RequeueLimitError, match=r"slurm.max_requeues \(2\) reached"):
        delayed.function.checkpoint()


def test_help_names_every_slurm_key_without_a_flag(capsys):
    """Every ``slurm.*`` key is either a flag or listed in ``--help`` (env, setup, mem_gb, ...)."""
    import dataclasses

    from lomdm_dist.config import SlurmConfig
    from lomdm_dist.launch.submit import _FLAG_TO_KEY

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    epilog = text[text.index("settings without a flag"):]
    without_flag = {f.name for f in dataclasses.fields(SlurmConfig)} - set(_FLAG_TO_KEY.values())
    assert {"env", "setup", "mem_gb"} <= without_flag
    for key in without_flag:
        assert f"  slurm.{key} " in epilog, key
    assert "submit and write nothing" in " ".join(text.split())    # --dry-run
