"""The LoMDM forward scheduler from the phi head's output: exponents, alpha, velocity and log q.

Per row b and position i (``docs/method.md``, sections 4 and 5):

    NormSig(g)_i = sigmoid(g_i) - mean_{valid j} sigmoid(g_j)
    k_i          = clamp(c1 + c2 * NormSig(g)_i, min=k_min)         (padding: k_i = c1)
    alpha_i      = 1 - t^k_i,   velocity_i = k_i / t
    log_q[r, b]  = sum_{valid i} [ m_ri * k_i log t + (1 - m_ri) * log(1 - t^k_i) ]

log q is the log-probability of mask r under the forward process; the RLOO surrogate
differentiates it. log(1 - t^k) is -inf at t = 1 and loses all precision near t = 1 if computed
as log(1 - exp(x)): both the reference and the kernel use forms that stay accurate there (and
near t = 0), and masked positions never touch it (a ``where``, not a product, so t = 1 gives no
0 * -inf). On CUDA a Triton kernel does the whole row in one program, forward and backward;
elsewhere the PyTorch reference runs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from kernels.dispatch import resolve_backend

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class ScheduleOut(NamedTuple):
    """k, alpha, velocity: (B, L) float32. log_q: (K, B) float32, or None when no masks were given."""

    k: Tensor
    alpha: Tensor
    velocity: Tensor
    log_q: Tensor | None


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0 (so log(1 - t^k) for x = k log t), -inf at x = 0.

    Maechler's split: log(-expm1(x)) near 0, log1p(-exp(x)) below -log 2; each branch is fed a
    harmless dummy where it is not selected so that the gradient never meets inf * 0.
    """
    near = x > -math.log(2.0)
    x_near = torch.where(near & (x < 0), x, torch.full_like(x, -0.5))
    x_far = torch.where(near, torch.full_like(x, -1.0), x)
    value = torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))
    return torch.where(x < 0, value, torch.full_like(x, float("-inf")))


def _check_inputs(fn: str, g: Tensor, t: Tensor, valid: Tensor, c1: float, c2: float, masks: Tensor | None,
                  k_min: float) -> None:
    if not isinstance(g, Tensor) or g.dim() != 2:
        raise ValueError(f"{fn}: g must be a 2-D (B, L) tensor, got "
                         f"{tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__}")
    if g.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: g must be one of {_FLOAT_DTYPES}, got {g.dtype}")
    n_rows, seq_len = g.shape
    if not isinstance(t, Tensor) or t.shape != (n_rows,):
        raise ValueError(f"{fn}: t must have shape ({n_rows},), got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{fn}: t must be floating point, got {t.dtype}")
    if not isinstance(valid, Tensor) or valid.shape != (n_rows, seq_len) or valid.dtype != torch.bool:
        raise ValueError(f"{fn}: valid must be a bool tensor of shape ({n_rows}, {seq_len}), got "
                         f"{getattr(valid, 'dtype', type(valid).__name__)} {tuple(getattr(valid, 'shape', ()))}")
    if masks is not None:
        if not isinstance(masks, Tensor) or masks.dim() != 3 or masks.shape[1:] != (n_rows, seq_len) \
                or masks.dtype != torch.bool:
            raise ValueError(f"{fn}: masks must be None or a bool tensor of shape (K, {n_rows}, {seq_len}), got "
                             f"{getattr(masks, 'dtype', type(masks).__name__)} {tuple(getattr(masks, 'shape', ()))}")
    named = {"g": g, "t": t, "valid": valid, **({"masks": masks} if masks is not None else {})}
    devices = {name: v.device for name, v in named.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{fn}: all tensors must be on one device, got {devices}")
    for name, value in (("c1", c1), ("c2", c2), ("k_min", k_min)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{fn}: {name} must be a finite number, got {value!r}")
    if k_min <= 0:
        raise ValueError(f"{fn}: k_min must be > 0 (exponents must stay positive), got {k_min}")
    if c1 <= 0:
        raise ValueError(f"{fn}: c1 must be > 0 (it is the exponent of padding and the mean exponent), got {c1}")
    if n_rows and not bool(((t > 0) & (t <= 1)).all()):
        bad = int((~((t > 0) & (t <= 1))).nonzero()[0, 0])
        raise ValueError(f"{fn}: t must lie in (0, 1], got t[{bad}] = {float(t[bad])}")


def _reference(g: Tensor, t: Tensor, valid: Tensor, c1: float, c2: float, masks: Tensor | None,
               k_min: float, dtype: torch.dtype | None = None) -> ScheduleOut:
    """``dtype`` of the arithmetic: float64 when ``g`` or ``t`` is float64 unless given. log t and 1/t
    are formed in float64 first, so a float64 t below float32's range (the importance-sampled times
    go down to 1e-304) keeps an exact log q."""
    if dtype is None:
        dtype = torch.float64 if torch.float64 in (g.dtype, t.dtype) else torch.float32
    sig = torch.sigmoid(g.to(dtype))
    weight = valid.to(dtype)
    mean = (sig * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp(min=1.0)
    k_raw = c1 + c2 * (sig - mean)
    k = torch.where(valid, k_raw.clamp(min=k_min), torch.full_like(k_raw, c1))
    t64 = t.double().unsqueeze(1)
    x = k * torch.log(t64).to(dtype)
    alpha = -torch.expm1(x)
    velocity = k * (1.0 / t64).to(dtype)
    log_q = None
    if masks is not None:
        term = torch.where(masks, x.unsqueeze(0), log1mexp(x).unsqueeze(0))
        log_q = torch.where(valid.unsqueeze(0), term, torch.zeros_like(term)).sum(dim=2)
    return ScheduleOut(k, alpha, velocity, log_q)


def lomdm_schedule(g: Tensor, t: Tensor, valid: Tensor, c1: float, c2: float, masks: Tensor | None = None, *,
                   k_min: float = 1e-4, backend: str = "auto") -> ScheduleOut:
    """k, alpha, velocity (B, L) and log_q (K, B) for head output ``g`` (B, L) at times ``t`` (B,).

    ``t`` in (0, 1], any float dtype (float64 keeps log q exact below float32's range); ``valid`` (B, L) bool, False = padding (excluded from NormSig's mean and from
    log q; its k is c1); ``masks`` None or (K, B, L) bool, True = masked. Outputs are float32.
    Differentiable w.r.t. ``g`` (through NormSig's mean too), not w.r.t. ``t``. ``backend``:
    "auto" (Triton on CUDA, else the reference), "torch" or "triton".
    """
    fn = "lomdm_schedule"
    _check_inputs(fn, g, t, valid, c1, c2, masks, k_min)
    if resolve_backend(backend, g, t, valid, kernel=fn) == "torch":
        return _reference(g, t, valid, c1, c2, masks, k_min, dtype=torch.float32)
    from kernels._scheduler_triton import lomdm_schedule_triton

    valid_u8 = valid.contiguous().view(torch.uint8)
    # K = 0 stands for "no masks"; any uint8 tensor of the right row layout serves as the pointer.
    masks_u8 = valid_u8.unsqueeze(0)[:0] if masks is None else masks.contiguous().view(torch.uint8)
    k, alpha, velocity, log_q = lomdm_schedule_triton(g.contiguous(), t, valid_u8, masks_u8,
                                                      c1, c2, k_min)
    return ScheduleOut(k, alpha, velocity, None if masks is None else log_q)


def lomdm_schedule_reference(g: Tensor, t: Tensor, valid: Tensor, c1: float, c2: float, masks: Tensor | None = None,
                             *, k_min: float = 1e-4) -> ScheduleOut:
    """PyTorch form of :func:`lomdm_schedule` (autograd does the backward).

    Computes in float32, or in float64 when ``g`` or ``t`` is float64 (the tests' oracle).
    """
    _check_inputs("lomdm_schedule_reference", g, t, valid, c1, c2, masks, k_min)
    return _reference(g, t, valid, c1, c2, masks, k_min)
