"""Provenance of sample files: ``tools/sample.py`` and the trainer's ``write_samples`` record how
each sample was made, on every line, and that record is enough to draw the same samples again."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from data_pipeline.tokenizers import get_tokenizer
from lomdm_dist.config import Config, DiffusionConfig, ModelConfig, config_to_dict
from lomdm_dist.diffusion.sampler import sample
from lomdm_dist.diffusion.schedulers import build_scheduler
from lomdm_dist.model import build_model
from lomdm_dist.checkpoint.distributed import save_checkpoint
from lomdm_dist.train.samples import write_samples
from helpers_tools import load_tool

STEP = 7


def _load_tool():
    return load_tool("sample")


def _config() -> Config:
    cfg = Config()
    cfg.model = ModelConfig(n_layers=1, d_model=16, n_heads=2, cond_dim=8)
    cfg.diffusion = DiffusionConfig(scheduler="mdlm")
    cfg.data.seq_len = 12
    return cfg


@pytest.fixture
def run(tmp_path):
    """A run directory whose one checkpoint (step 7) holds raw weights and different EMA weights;
    returns (run dir, config, raw state, EMA state)."""
    cfg = _config()
    vocab = get_tokenizer(cfg.data.tokenizer).vocab_size + 1
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion, vocab)
    with torch.no_grad():                       # non-trivial output layer (it starts at zero)
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: v + 0.5 * torch.randn_like(v) for k, v in raw.items()}
    save_checkpoint(tmp_path / "run", STEP, model_state=raw, ema_state=ema, trainer_state={},
                    config_yaml=yaml.safe_dump(config_to_dict(cfg)), meta={"vocab_size": vocab}, keep=1)
    return tmp_path / "run", cfg, raw, ema


def _redraw(cfg: Config, state: dict, prov: dict) -> torch.Tensor:
    """Samples drawn again from the recorded settings alone, with a model built here."""
    model = build_model(cfg.model, cfg.diffusion, get_tokenizer(prov["tokenizer"]).vocab_size + 1)
    model.load_state_dict(state)
    result = sample(model.eval(), build_scheduler(cfg.diffusion), num=prov["num"], seq_len=prov["seq_len"],
                    steps=prov["steps"], diffusion_cfg=cfg.diffusion, t_min=prov["t_min"],
                    final_argmax=prov["final_argmax"], reverse_c2_zero=prov["reverse_c2_zero"], seed=prov["seed"],
                    batch_size=prov["batch_size"])
    return result.tokens


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_every_line_names_checkpoint_step_weights_and_sampler_settings(run, tmp_path, weights):
    run_dir, cfg, raw, ema = run
    out = tmp_path / "samples.jsonl"
    argv = ["--ckpt", str(run_dir), "--num", "3", "--steps", "5", "--seed", "11", "--batch-size", "2",
            "--t-min", "0.001", "--out", str(out), "--device", "cpu"] + (["--no-ema"] if weights == "raw" else [])
    assert _load_tool().main(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3 and all({"text", "tokens", "order", "entropy"} <= line.keys() for line in lines)
    prov = lines[0]["provenance"]
    assert all(line["provenance"] == prov for line in lines)
    assert prov == {"checkpoint": str((run_dir / "checkpoints" / f"step-{STEP:08d}").resolve()), "step": STEP,
                    "weights": weights, "seed": 11, "steps": 5, "t_min": 0.001, "num": 3, "seq_len": 12,
                    "batch_size": 2, "final_argmax": True, "reverse_c2_zero": False, "scheduler": "mdlm",
                    "tokenizer": "gpt2", "device": "cpu", "top_p": 1.0, "prefix": None, "infill": None,
                    # positions left for the final argmax: those no step unmasked (order == steps)
                    "argmax_filled": sum(o == 5 for line in lines for o in line["order"])}
    redrawn = _redraw(cfg, ema if weights == "ema" else raw, prov)
    assert [line["tokens"] for line in lines] == redrawn.tolist()
    other = _redraw(cfg, raw if weights == "ema" else ema, prov)
    assert other.tolist() != redrawn.tolist()      # the weights entry matters: the two sets differ


def test_a_checkpoint_without_ema_is_recorded_as_raw_weights(tmp_path, capsys):
    cfg = _config()
    vocab = get_tokenizer(cfg.data.tokenizer).vocab_size + 1
    model = build_model(cfg.model, cfg.diffusion, vocab)
    path = save_checkpoint(tmp_path / "run", 3, model_state=model.state_dict(), ema_state=None, trainer_state={},
                           config_yaml=yaml.safe_dump(config_to_dict(cfg)), meta={"vocab_size": vocab}, keep=1)
    out = tmp_path / "s.jsonl"
    assert _load_tool().main(["--ckpt", str(path), "--num", "1", "--steps", "2", "--out", str(out)]) == 0
    prov = json.loads(out.read_text().splitlines()[0])["provenance"]
    assert (prov["weights"], prov["step"], prov["checkpoint"]) == ("raw", 3, str(path.resolve()))
    assert (prov["seed"], prov["t_min"], prov["batch_size"]) == (cfg.sample.seed, cfg.sample.t_min, 1)
    assert "holds no EMA weights" in capsys.readouterr().err


def test_write_samples_puts_the_provenance_on_every_line(tmp_path):
    class Result:
        tokens = torch.tensor([[1, 2, 3], [4, 5, 9]])
        order = torch.tensor([[0, 1, 2], [2, 1, 0]])

    path = tmp_path / "samples" / "step-00000004.jsonl"
    texts = write_samples(path, Result, lambda ids: " ".join(map(str, ids)), vocab_size=9,
                          provenance={"step": 4, "seed": 4, "steps": 8})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert texts == ["1 2 3", "4 5"] == [line["text"] for line in lines]
    assert [line["provenance"] for line in lines] == [{"step": 4, "seed": 4, "steps": 8}] * 2
    write_samples(path, Result, str, vocab_size=9)               # no provenance given: no field
    assert all("provenance" not in json.loads(line) for line in path.read_text().splitlines())
