"""How diffusion times are drawn, and the weight that makes the NELBO estimate unbiased.

The NELBO is an integral over t in (0, 1] of the expected masked-token loss. Every velocity of the
OeMDM family scales like 1/t (A = k/t for 1 - alpha = t^k, 1/t for MDLM), so the objective works
with the *t-scaled* velocities v = A t, which stay finite at any t, and one factor per row,

    row_weight(t) = w(t) / t,      w(t) = 1 / p(t)  (the importance weight of the time density p),

multiplies the row's sum of t-scaled token losses. Two ways to draw t:

* ``truncated`` (MDLM, GenMD4): t uniform on [t_eps, 1], w = 1. It drops the integral over
  (0, t_eps). With one exponent k for every position that is the share t_eps^k of the loss (0.1% for
  MDLM), but with per-position exponents it is t_eps^k_i per position: 0.8% at k = 0.7, 25% at
  k = 0.2, 71% at k = 0.05. The estimate is then below the bound, and its gradient pays the forward
  scheduler to spread the exponents (sum_i t_eps^k_i grows when the k_i spread around a fixed mean).
  Kept for numbers comparable with MDLM's.
* ``importance``: t from the mixture p(t) = lam * b t^(b-1) + (1 - lam) on (0, 1], w = 1 / p(t).
  The estimate is unbiased over the whole interval. For a position with exponent k, the
  per-position second moment is proportional to the integral of t^(k-2) / p(t), which is finite
  iff k > b: with b < c1 - c2 (the smallest possible exponent) every position has finite variance.
  The uniform share keeps the variance of ordinary positions close to the truncated estimator's
  (docs/method.md, "Time sampling", has the numbers), and row_weight = 1 / (lam b t^b + (1-lam) t)
  stays finite as t -> 0.

Times are drawn by inverting the CDF F(t) = lam t^b + (1 - lam) t at stratified uniforms, so the
antithetic stratification over the global batch carries over. Everything is done in log t (float64):
with b = 0.025, t = u^(1/b) underflows float32 at u ~ 0.1. log t is floored at ``LOG_T_FLOOR``
= -700 so that t itself stays a positive float64; the share of a position's loss below that time
is exp(-700 k) <= 1e-15 for k >= 0.05, far below float64's resolution of the sum.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import DiffusionConfig

LOG_T_FLOOR = -700.0
"""Smallest log t drawn (t ~ 1e-304, a positive float64)."""


@dataclass(frozen=True)
class TimeDraw:
    """Per-row times and weights, float64, shape (B,)."""

    t: Tensor
    """Diffusion time in (0, 1]."""
    log_t: Tensor
    """log t, exact where t is tiny."""
    row_weight: Tensor
    """w(t) / t: multiplies the row's sum of t-scaled token losses."""

    def __getitem__(self, index) -> "TimeDraw":
        """The rows ``index`` (a slice or index tensor) of every field."""
        return TimeDraw(self.t[index], self.log_t[index], self.row_weight[index])


class TimeSampler(ABC):
    """Maps stratified uniforms u in [0, 1) to a :class:`TimeDraw`."""

    name = ""

    @abstractmethod
    def draw(self, u: Tensor) -> TimeDraw:
        """Times, log-times and row weights for the uniforms u (B,)."""


class TruncatedUniform(TimeSampler):
    """t = t_eps + (1 - t_eps) u, weight 1 (MDLM's estimator of the integral over [t_eps, 1])."""

    name = "truncated"

    def __init__(self, t_eps: float):
        self.t_eps = float(t_eps)

    def draw(self, u: Tensor) -> TimeDraw:
        t = (1.0 - self.t_eps) * u.double() + self.t_eps
        return TimeDraw(t=t, log_t=torch.log(t), row_weight=1.0 / t)


class PowerUniformMixture(TimeSampler):
    """p(t) = lam b t^(b-1) + (1 - lam) on (0, 1]; unbiased over the whole interval."""

    name = "importance"
    _BISECTION_STEPS = 96
    """Halvings of a bracket at most |log u| / b <= 1,500 wide: far below float64 spacing."""

    def __init__(self, power: float, power_share: float):
        if not 0.0 < power < 1.0:
            raise ValueError(f"importance sampling power b must be in (0, 1), got {power}")
        if not 0.0 < power_share <= 1.0:
            raise ValueError(f"importance sampling power share must be in (0, 1], got {power_share}")
        self.power, self.share = float(power), float(power_share)

    def log_cdf_inverse(self, u: Tensor) -> Tensor:
        """log t with F(t) = lam t^b + (1 - lam) t = u, for u in (0, 1] (float64, by bisection)."""
        log_u = torch.log(u.double())
        b, lam = self.power, self.share
        # F(u^(1/b)) <= u <= F(u) because t^b >= t on (0, 1]: the root lies in [log u / b, log u].
        lo, hi = log_u / b, log_u.clone()
        for _ in range(self._BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            above = lam * torch.exp(b * mid) + (1.0 - lam) * torch.exp(mid) > u
            hi = torch.where(above, mid, hi)
            lo = torch.where(above, lo, mid)
        return 0.5 * (lo + hi)

    def draw(self, u: Tensor) -> TimeDraw:
        # 1 - u lies in (0, 1]: t > 0 always, and t = 1 is reachable.
        log_t = self.log_cdf_inverse(1.0 - u.double()).clamp(min=LOG_T_FLOOR, max=0.0)
        t = torch.exp(log_t)
        row_weight = 1.0 / (self.share * self.power * torch.exp(self.power * log_t) + (1.0 - self.share) * t)
        return TimeDraw(t=t, log_t=log_t, row_weight=row_weight)


def smallest_exponent(cfg: DiffusionConfig) -> float:
    """The smallest per-position velocity exponent the scheduler can produce: how fast its
    integrand t^(k-1) may grow as t -> 0 (k = 1 for the MDLM, ARM and block schedules)."""
    if cfg.scheduler == "lomdm":
        return cfg.c1 - cfg.c2
    if cfg.scheduler == "poly":
        return cfg.c1
    return 1.0


def resolved_time_sampling(cfg: DiffusionConfig) -> str:
    """``importance`` or ``truncated``; ``auto`` is importance for the learned scheduler."""
    if cfg.time_sampling != "auto":
        return cfg.time_sampling
    return "importance" if cfg.scheduler == "lomdm" else "truncated"


def resolved_power(cfg: DiffusionConfig) -> float:
    """The power b of the importance density: ``diffusion.is_power``, or half the smallest exponent."""
    return cfg.is_power if cfg.is_power > 0 else 0.5 * smallest_exponent(cfg)


def build_time_sampler(cfg: DiffusionConfig) -> TimeSampler:
    if resolved_time_sampling(cfg) == "truncated":
        return TruncatedUniform(cfg.t_eps)
    return PowerUniformMixture(resolved_power(cfg), cfg.is_power_share)


def check_time_sampling(cfg: DiffusionConfig) -> str | None:
    """A message naming the key when the importance density would give infinite variance."""
    if resolved_time_sampling(cfg) != "importance":
        return None
    b, k_low = resolved_power(cfg), smallest_exponent(cfg)
    if not b < k_low or not math.isfinite(b):
        return (f"diffusion.is_power ({b}) must be below the smallest exponent ({k_low:g}): positions with "
                f"exponents k <= b give the importance-sampled NELBO infinite variance")
    if not 0.0 < cfg.is_power_share <= 1.0:
        return f"diffusion.is_power_share must be in (0, 1], got {cfg.is_power_share}"
    return None
