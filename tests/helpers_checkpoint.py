"""A tiny GPT-2-vocabulary checkpoint for the sampling tools' tests."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from data_pipeline.tokenizers import Tokenizer, get_tokenizer
from lomdm_dist.checkpoint.distributed import save_checkpoint
from lomdm_dist.config import Config, DiffusionConfig, ModelConfig, config_to_dict
from lomdm_dist.model import build_model


def write_tiny_checkpoint(run_dir: Path, *, step: int = 5, seq_len: int = 12) -> Tokenizer:
    """Save a one-block MDLM model over GPT-2 BPE (+ mask) as ``run_dir``'s checkpoint ``step`` through
    the trainer's checkpoint module; return the tokenizer. Its weights are perturbed so that the
    output layer (zero at initialisation) gives non-uniform predictions."""
    cfg = Config()
    cfg.model = ModelConfig(n_layers=1, d_model=16, n_heads=2, cond_dim=8)
    cfg.diffusion = DiffusionConfig(scheduler="mdlm")
    cfg.data.seq_len = seq_len
    tok = get_tokenizer("gpt2")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion, tok.vocab_size + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    save_checkpoint(run_dir, step, model_state=model.state_dict(), ema_state=None, trainer_state={},
                    config_yaml=yaml.safe_dump(config_to_dict(cfg)), meta={"vocab_size": tok.vocab_size + 1},
                    keep=1)
    return tok
