"""Exponential moving average of the parameters, keyed by parameter name.

Keyed by name (not by position in a list, as MDLM stores it) so that an EMA survives changes of
module order, sharding and checkpoint conversion. Decay warm-up as MDLM:
``decay_n = min(decay, (1 + n) / (10 + n))``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone().float() for name, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)
        self.num_updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into ``model`` (for evaluation and sampling)."""
        backup = {}
        for name, p in model.named_parameters():
            if name in self.shadow:
                backup[name] = p.detach().clone()
                p.copy_(self.shadow[name].to(p.dtype))
        try:
            yield
        finally:
            for name, p in model.named_parameters():
                if name in backup:
                    p.copy_(backup[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        unexpected = set(state["shadow"]) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
        self.num_updates = int(state["num_updates"])
