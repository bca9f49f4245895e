"""A ready model from a checkpoint, in one process: for sampling, evaluation and the tools.

The config comes from the checkpoint's own ``config.yaml`` (read from memory, checked like any
config), the vocabulary size from ``meta.json``, and the weights (EMA when saved and asked for)
from the sharded training state, whatever layout wrote it: the Distributed Checkpoint loader
reshards it into this plain model.
"""

from __future__ import annotations

import os

import torch

from ..config import Config, config_from_yaml
from ..diffusion.schedulers import build_scheduler
from ..model import build_model
from .distributed import load_distributed_checkpoint
from .protocol import STATE_DIR, read_meta, resolve_checkpoint
from .shards import saved_parts


def load_inference_model(ckpt: str | os.PathLike, *, use_ema: bool = True, device: str = "cpu"):
    """(config, model in eval mode, scheduler) from a checkpoint or run directory, in one process."""
    path = resolve_checkpoint(ckpt)
    cfg: Config = config_from_yaml((path / "config.yaml").read_text(), source=f"checkpoint config {path / 'config.yaml'}")
    model = build_model(cfg.model, cfg.diffusion, int(read_meta(path)["vocab_size"]))
    params = dict(model.named_parameters())
    has_ema = use_ema and "ema" in saved_parts(path / STATE_DIR)
    shadow = {name: torch.empty_like(p, dtype=torch.float32) for name, p in params.items()} if has_ema else None
    load_distributed_checkpoint(path, model=model, ema_shadow=shadow)
    if shadow is not None:
        with torch.no_grad():
            for name, value in shadow.items():
                params[name].copy_(value)
    model.to(device).eval()
    return cfg, model, build_scheduler(cfg.diffusion)
