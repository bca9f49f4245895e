"""Diagnostics of the learned generation order: the step statistics and the priority map.

Whether LoMDM learns an order shows in its exponents, not in its loss: the spread of k_phi (forward)
and k_hat (reverse) over positions, and the share of NormSig sigmoids that are saturated (a
saturated position barely moves its exponent, whatever its gradient; docs/method.md, "Keeping the
learned order alive"). Two readers need them:

* every training step logs :class:`StepSums` turned into ``LossOutput.stats``. The objective adds
  the sums of each row set (a whole batch, or one pipeline microbatch), the layout sums them over
  data-parallel ranks, and only then are ratios taken, so the statistics describe the global batch
  in any layout;
* the trainer draws :func:`priority_exponents` of a few validation rows as a histogram and an image.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, is_dataclass
from typing import Callable

import torch
from torch import Tensor

from .schedulers import LoMDMScheduler

SATURATION_SLOPE = 1e-3
"""A sigmoid counts as saturated where its slope sigma' is below this (|input| > 6.9): its
position then barely moves its exponent, whatever the gradient."""


def _f64(value: float, device) -> Tensor:
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def _map_tensors(obj, fn: Callable[[Tensor], Tensor]):
    """A copy of the dataclass ``obj`` with ``fn`` applied to every tensor field, nested dataclasses
    included (absent parts stay None). One traversal order, so flattening and rebuilding agree."""
    values = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        values[f.name] = None if value is None else _map_tensors(value, fn) if is_dataclass(value) else fn(value)
    return type(obj)(**values)


def _add(a, b):
    """Field-wise sum of two dataclasses of tensors with the same parts present."""
    values = {}
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if (x is None) != (y is None):
            raise ValueError(f"StepSums: {f.name} is present in one row set and absent in the other")
        values[f.name] = None if x is None else _add(x, y) if is_dataclass(x) else x + y
    return type(a)(**values)


@dataclass
class ExponentSums:
    """Sums over positions of one head's exponents k (float64): mean and spread from these."""

    total: Tensor
    squares: Tensor
    count: Tensor
    saturated: Tensor
    """Positions whose NormSig sigmoid is saturated."""

    @classmethod
    def of(cls, k: Tensor, sigmoid_input: Tensor) -> ExponentSums:
        """From the exponents ``k`` and what entered their sigmoids, at the positions to count."""
        k = k.detach().double()
        sig = torch.sigmoid(sigmoid_input.detach().float())
        saturated = sig * (1.0 - sig) < SATURATION_SLOPE
        return cls(total=k.sum(), squares=(k ** 2).sum(), count=_f64(k.numel(), k.device),
                   saturated=saturated.double().sum())


@dataclass
class StepSums:
    """Detached float64 sums and counts that the step statistics are made of, added across row sets."""

    masked: Tensor
    """Masked valid positions over all K copies."""
    valid_copies: Tensor
    """Valid positions times K."""
    t_total: Tensor
    rows: Tensor
    k_phi: ExponentSums | None = None
    """Forward exponents at valid positions (learned scheduler only)."""
    k_hat: ExponentSums | None = None
    """Reverse exponents at valid positions of the masked copies (learned scheduler only)."""
    g_phi_total: Tensor | None = None
    """Sum of the phi head's raw output at valid positions (learned scheduler only)."""

    def __add__(self, other: StepSums) -> StepSums:
        return _add(self, other)

    def reduced(self, reduce: Callable[[Tensor], Tensor]) -> StepSums:
        """Every sum passed through ``reduce`` (e.g. a sum over data-parallel ranks) in one call."""
        flat: list[Tensor] = []
        _map_tensors(self, lambda v: flat.append(v.double().reshape(())) or v)
        values = iter(reduce(torch.stack(flat)))
        return _map_tensors(self, lambda v: next(values))

    def statistics(self) -> dict[str, Tensor]:
        """Mean and (unbiased) std over valid positions of k_phi and k_hat (the spread is what says
        whether an order is learned), the share of their saturated sigmoids, the mean of g_phi,
        masked fraction, mean t; float32 scalars."""
        stats: dict[str, Tensor] = {}
        for prefix, sums in (("k_phi", self.k_phi), ("k_hat", self.k_hat)):
            if sums is None:
                continue
            n = sums.count
            mean = sums.total / n.clamp(min=1)
            var = (sums.squares - n * mean ** 2) / (n - 1).clamp(min=1)
            stats[f"{prefix}_mean"] = mean.float()
            stats[f"{prefix}_std"] = var.clamp(min=0).sqrt().float()
            stats[f"{prefix}_saturated"] = (sums.saturated / n.clamp(min=1)).float()
        if self.g_phi_total is not None:
            stats["g_phi_mean"] = (self.g_phi_total / self.k_phi.count.clamp(min=1)).float()
        stats["masked_fraction"] = (self.masked / self.valid_copies.clamp(min=1)).float()
        stats["t_mean"] = (self.t_total / self.rows).float()
        return stats


@torch.no_grad()
def priority_exponents(model, scheduler: LoMDMScheduler, x: Tensor, valid: Tensor, *,
                       autocast_dtype: torch.dtype | None = None) -> Tensor:
    """k_phi (B, L) of the clean rows ``x``: the generation priority the forward scheduler gives each
    position (large k: unmasked early in generation). Runs the objective's clean pass (the backbone
    on the clean rows at sigma = 0, then the phi head) in eval mode, under autocast when
    ``autocast_dtype`` is given; the exponents do not depend on t, so t = 1/2 is passed."""
    backbone = model.backbone
    t = torch.full((x.shape[0],), 0.5, device=x.device)
    autocast = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    try:
        with autocast:
            c = backbone.conditioning(x.shape[0], torch.zeros_like(t))
            g = model.phi(backbone.features(x, c), c).float()
    finally:
        model.train(was_training)
    return scheduler.exponents(g, t, valid).k
