"""Forward schedulers of the OeMDM family: alpha (probability a position is still clean), velocity A.

Every scheduler returns log-space quantities so that log q of a mask and the reverse step are
computed without cancellation near t -> 0 and t -> 1:

* ``log_masked = log(1 - alpha)``, ``log_clean = log(alpha)``, ``velocity = -alpha' / (1 - alpha)``.

Families (see docs/method.md):
* ``mdlm``  log-linear: 1 - alpha = (1 - eps) t, A = 1/t.
* ``poly``  1 - alpha = t^c (c = diffusion.c1), A = c/t.
* ``block`` windows of ``block_size`` positions; block j (1-based, nb blocks) is noised linearly only
  inside t in [(nb - j)/nb, (nb - j + 1)/nb]; an eps * t term keeps alpha strictly decreasing:
  1 - alpha = (1 - eps) clip(nb t - (nb - j), 0, 1) + eps t. With block_size = 1 this is the
  eps-regularised autoregressive scheduler ``arm`` (position 1 generated first).
* ``lomdm`` learned: 1 - alpha = t^k with per-position exponents k from the phi head (k_hat from psi
  for the reverse process); see ``kernels.scheduler.lomdm_schedule``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kernels.scheduler import ScheduleOut, lomdm_schedule

from ..config import DiffusionConfig


@dataclass
class Schedule:
    log_masked: torch.Tensor
    """log P(position masked at t) = log(1 - alpha), (B, L)."""
    log_clean: torch.Tensor
    """log alpha, (B, L)."""
    velocity: torch.Tensor
    """A = -alpha'(t) / (1 - alpha(t)), (B, L)."""


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class Scheduler(ABC):
    """Common interface. ``k`` is the per-position exponent (B, L) for the learned scheduler."""

    name: str = ""
    learned: bool = False

    @abstractmethod
    def schedule(self, t: torch.Tensor, seq_len: int, k: torch.Tensor | None = None) -> Schedule:
        """alpha and velocity at times t (B,) for every position of a length-``seq_len`` row."""

    def log_masked(self, t: torch.Tensor, seq_len: int, k: torch.Tensor | None = None) -> torch.Tensor:
        return self.schedule(t, seq_len, k).log_masked

    def unmask_prob(self, t: torch.Tensor, s: torch.Tensor, seq_len: int,
                    k: torch.Tensor | None = None) -> torch.Tensor:
        """Reverse step s < t: P(a position masked at t is clean at s) = (alpha_s - alpha_t) / (1 - alpha_t).

        Written as 1 - (1 - alpha_s)/(1 - alpha_t) = -expm1(log_masked_s - log_masked_t); equals 1 at s = 0.
        """
        lm_t = self.log_masked(t, seq_len, k)
        lm_s = self.log_masked(s, seq_len, k)
        return (-torch.expm1(lm_s - lm_t)).clamp(0.0, 1.0)

    def log_q(self, sched: Schedule, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """log q(z | x) of masks (..., B, L) summed over valid positions -> (..., B)."""
        terms = torch.where(masks, sched.log_masked, sched.log_clean)
        return torch.where(valid, terms, torch.zeros_like(terms)).sum(-1)


def _times(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 1)


class MDLMLogLinear(Scheduler):
    name = "mdlm"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def schedule(self, t, seq_len, k=None):
        t = _times(t).expand(-1, seq_len)
        masked = (1.0 - self.eps) * t
        return Schedule(log_masked=math.log1p(-self.eps) + torch.log(t),
                        log_clean=torch.log1p(-masked),
                        velocity=1.0 / t)


class Polynomial(Scheduler):
    name = "poly"

    def __init__(self, exponent: float):
        self.exponent = exponent

    def schedule(self, t, seq_len, k=None):
        t = _times(t).expand(-1, seq_len)
        log_masked = self.exponent * torch.log(t)
        return Schedule(log_masked=log_masked, log_clean=log1mexp(log_masked), velocity=self.exponent / t)


class Windowed(Scheduler):
    """Block diffusion (``block``) and, with block_size 1, the autoregressive scheduler (``arm``)."""

    def __init__(self, block_size: int, eps: float, name: str):
        self.block_size = block_size
        self.eps = eps
        self.name = name

    def schedule(self, t, seq_len, k=None):
        if seq_len % self.block_size:
            raise ValueError(f"block_size {self.block_size} does not divide sequence length {seq_len}")
        n_blocks = seq_len // self.block_size
        block = torch.arange(seq_len, device=t.device) // self.block_size + 1          # 1-based
        t = _times(t).to(torch.float64 if t.dtype == torch.float64 else torch.float32)
        u = n_blocks * t - (n_blocks - block.to(t.dtype))                                # (B, L)
        inside = (u > 0) & (u < 1)
        masked = (1.0 - self.eps) * u.clamp(0.0, 1.0) + self.eps * t
        speed = (1.0 - self.eps) * n_blocks * inside.to(t.dtype) + self.eps
        return Schedule(log_masked=torch.log(masked), log_clean=torch.log1p(-masked), velocity=speed / masked)


class LoMDMScheduler(Scheduler):
    """1 - alpha = t^k with exponents k from the phi head (forward) or psi head (reverse).

    The scheduler owns its parameters: :meth:`exponents` turns a head's output g into k (and alpha,
    velocity, log q) with this scheduler's c1, c2, k_min and NormSig variant, through the kernel.
    """

    name = "lomdm"
    learned = True

    def __init__(self, c1: float, c2: float, k_min: float = 1e-4, normsig: str = "centered"):
        if normsig not in ("centered", "paper"):
            raise ValueError(f"normsig must be 'centered' or 'paper', got {normsig!r}")
        self.c1, self.c2, self.k_min, self.normsig = c1, c2, k_min, normsig

    def schedule(self, t, seq_len, k=None):
        if k is None:
            raise ValueError("the lomdm scheduler needs per-position exponents k")
        log_t = torch.log(_times(t))
        log_masked = k * log_t
        return Schedule(log_masked=log_masked, log_clean=log1mexp(log_masked), velocity=k / _times(t))

    def normsig_input(self, g: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """What enters the sigmoid of NormSig: g itself (``paper``) or g minus its mean over the row's
        valid positions (``centered``). Centring makes k invariant to a common shift of g, which
        otherwise is a direction with (almost) no gradient that Adam can walk the read-out along
        until every sigmoid saturates (docs/method.md, "Keeping the learned order alive")."""
        if self.normsig == "paper":
            return g
        weight = valid.to(g.dtype)
        mean = (g * weight).sum(-1, keepdim=True) / weight.sum(-1, keepdim=True).clamp(min=1.0)
        return g - mean

    def exponents(self, g: torch.Tensor, t: torch.Tensor, valid: torch.Tensor,
                  masks: torch.Tensor | None = None) -> ScheduleOut:
        """k, alpha, velocity (B, L) and log q (K, B) of masks, from the head output g (B, L)."""
        return lomdm_schedule(self.normsig_input(g, valid), t, valid, self.c1, self.c2, masks, k_min=self.k_min)


def build_scheduler(cfg: DiffusionConfig) -> Scheduler:
    if cfg.scheduler == "mdlm":
        return MDLMLogLinear(cfg.mdlm_eps)
    if cfg.scheduler == "poly":
        return Polynomial(cfg.c1)
    if cfg.scheduler == "arm":
        return Windowed(1, cfg.window_eps, "arm")
    if cfg.scheduler == "block":
        return Windowed(cfg.block_size, cfg.window_eps, "block")
    if cfg.scheduler == "lomdm":
        return LoMDMScheduler(cfg.c1, cfg.c2, cfg.k_min, cfg.normsig)
    raise ValueError(f"diffusion.scheduler: unknown scheduler {cfg.scheduler!r}")
