"""AdamW with separate parameter groups for the backbone and the scheduler heads.

The learning rate is a pure function of the step (linear warm-up, then constant, as MDLM), so a
resumed run needs no scheduler state: ``set_learning_rate(optimizer, step)`` before each update.
"""

from __future__ import annotations

import torch

from ..config import OptimConfig

HEAD_PREFIXES = ("phi.", "psi.")


def parameter_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Backbone and heads in separate groups (the heads may use ``optim.scheduler_lr``)."""
    backbone, heads = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (heads if name.startswith(HEAD_PREFIXES) else backbone).append(param)
    groups = [{"name": "backbone", "params": backbone, "base_lr": cfg.lr}]
    if heads:
        groups.append({"name": "scheduler_heads", "params": heads, "base_lr": cfg.scheduler_lr or cfg.lr})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, *, fused: bool = False) -> torch.optim.AdamW:
    groups = parameter_groups(model, cfg)
    for group in groups:
        group["lr"] = group["base_lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def lr_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up from 1/warmup to 1 over ``warmup_steps`` updates, then constant."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def set_learning_rate(optimizer: torch.optim.Optimizer, step: int, warmup_steps: int) -> float:
    factor = lr_factor(step, warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
