"""Velocity-weighted masked cross-entropy and the velocity-matching term, per token.

For each token row n (only rows where ``loss_mask`` is True):

    l_main[n]     = -A[n] * log_softmax_{v != mask}(logits[n])[target[n]]          (SUBS)
    l_velocity[n] =  A[n] * (log A[n] - log A_hat[n]) - (A[n] - A_hat[n])

These two are the per-position integrand of the LoMDM NELBO (``docs/method.md``); the loss sums them
over masked positions. On CUDA the Triton kernel reads the (N, V) logits once forward and once
backward and never builds the log-softmax; elsewhere the PyTorch reference runs.

l_velocity is evaluated as A * f(d) with d = (A_hat - A) / A and f(d) = d - log(1 + d), using a
series for small d: the textbook form cancels catastrophically when A_hat ~ A, which is exactly
where a trained psi head lives.

Vocab-parallel form (tensor-parallel output layer; each rank holds columns
[vocab_start, vocab_start + V_local) of the logits). Protocol, per rank, with ``loss_mask`` equal
on every rank:

    p = vocab_parallel_partials(logits_slice, targets, vocab_start=..., mask_token_id=..., loss_mask=...)
    M = p.local_max.clone();  all_reduce(M, op=MAX)                       # no gradient
    S = all_reduce_sum(rescale_sumexp(p.local_sumexp, p.local_max, M))    # differentiable
    Z = all_reduce_sum(p.local_target_logit)                              # differentiable
    l_main, l_velocity = combine_vocab_parallel(VocabPartials(M, S, Z), A, A_hat, loss_mask=...)

The two sum all-reduces must pass gradients through unchanged (identity backward, as Megatron's
vocab-parallel cross-entropy does): every rank computes the same replicated loss, so an
all-reduce in the backward (``torch.distributed.nn.functional.all_reduce``) would multiply the
gradient by the group size. The gradient each rank then gets for its slice is
A * (exp(x_v - logsumexp_global) - [v == target]) with the mask column at 0. In one process,
``combine_vocab_parallel([p_rank0, p_rank1, ...], A, A_hat)`` performs the same reduction.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from kernels.dispatch import resolve_backend

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class VocabPartials(NamedTuple):
    """Per-row statistics of one vocabulary slice (or, after reduction, of the whole vocabulary).

    local_max: max logit over the slice, the mask token excluded (-inf if nothing is left; 0 on rows
        outside the loss mask). Not differentiable.
    local_sumexp: sum over the slice of exp(logit - local_max) (0 off the loss mask).
    local_target_logit: the target's logit if the target lies in the slice, else 0.
    """

    local_max: Tensor
    local_sumexp: Tensor
    local_target_logit: Tensor


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------

def _check_row_vector(name: str, value: Tensor, n_rows: int, fn: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.shape != (n_rows,):
        raise ValueError(f"{fn}: {name} must have shape ({n_rows},) to match logits, got {tuple(value.shape)}")


def _prepare_rows(fn: str, logits: Tensor, targets: Tensor, loss_mask: Tensor | None,
                  mask_token_id: int | None, A: Tensor | None = None, A_hat: Tensor | None = None, *,
                  vocab_start: int | None = None) -> Tensor:
    """Validate shapes, dtypes, devices and (with one host sync) values; return the row mask.

    ``vocab_start`` is None for a full-vocabulary call (targets must lie in [0, V)) and the slice
    offset for a vocab-parallel call (targets must only be >= 0: other ranks hold the rest).
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"{fn}: logits must be a 2-D (N, V) tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{fn}: logits must be one of {_LOGIT_DTYPES}, got {logits.dtype}")
    n_rows, n_cols = logits.shape
    _check_row_vector("targets", targets, n_rows, fn)
    if targets.dtype != torch.int64:
        raise TypeError(f"{fn}: targets must be int64, got {targets.dtype}")
    if loss_mask is None:
        loss_mask = torch.ones(n_rows, dtype=torch.bool, device=logits.device)
    _check_row_vector("loss_mask", loss_mask, n_rows, fn)
    if loss_mask.dtype != torch.bool:
        raise TypeError(f"{fn}: loss_mask must be bool, got {loss_mask.dtype}")
    for name, value in (("A", A), ("A_hat", A_hat)):
        if value is not None:
            _check_row_vector(name, value, n_rows, fn)
            if not value.dtype.is_floating_point:
                raise TypeError(f"{fn}: {name} must be floating point, got {value.dtype}")
    named = [("logits", logits), ("targets", targets), ("loss_mask", loss_mask), ("A", A), ("A_hat", A_hat)]
    devices = {name: v.device for name, v in named if v is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{fn}: all tensors must be on one device, got {devices}")
    if mask_token_id is not None:
        if not isinstance(mask_token_id, int) or mask_token_id < 0:
            raise ValueError(f"{fn}: mask_token_id must be None or an int >= 0, got {mask_token_id!r}")
        if vocab_start is None and mask_token_id >= n_cols:
            raise ValueError(f"{fn}: mask_token_id={mask_token_id} is outside the vocabulary of {n_cols} logits")

    # Value checks on the active rows only (other rows may carry ignore-index targets etc.).
    upper = n_cols if vocab_start is None else torch.iinfo(torch.int64).max
    flags = [("targets outside [0, V) on loss rows", (targets < 0) | (targets >= upper))]
    if mask_token_id is not None:
        flags.append((f"targets equal to mask_token_id={mask_token_id} on loss rows (SUBS gives them "
                      "probability 0)", targets == mask_token_id))
    for name, value in (("A", A), ("A_hat", A_hat)):
        if value is not None:
            flags.append((f"{name} not positive and finite on loss rows",
                          ~(value.detach() > 0) | ~torch.isfinite(value.detach())))
    bad = torch.stack([(f & loss_mask).any() for _, f in flags]).tolist() if n_rows else []
    for (message, flag), is_bad in zip(flags, bad):
        if is_bad:
            first = int((flag & loss_mask).nonzero()[0, 0])
            raise ValueError(f"{fn}: {message} (first at row {first})")
    return loss_mask


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64 (the tests' oracle)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------------
# PyTorch reference pieces
# --------------------------------------------------------------------------------------------------

def excess_log_ratio(d: Tensor) -> Tensor:
    """d - log(1 + d) for d > -1, accurate for small d (series through d^14 below |d| < 1/4, as in
    the kernel).

    torch.log1p alone does not help: d - log1p(d) still subtracts two numbers of size d to get one
    of size d^2/2.
    """
    series = torch.zeros_like(d)
    for n in range(14, 1, -1):  # Horner for sum_{n=2..14} (-1)^n d^n / n, over d^2
        series = series * d + (1.0 if n % 2 == 0 else -1.0) / n
    # float64 needs 1e-16 from the series: use it only where the direct form would lose > 2 digits.
    limit = 0.01 if d.dtype == torch.float64 else 0.25
    return torch.where(d.abs() < limit, series * d * d, d - torch.log1p(d))


def _velocity_term(A: Tensor, A_hat: Tensor) -> Tensor:
    """A (log A - log A_hat) - (A - A_hat), written as A * f((A_hat - A) / A)."""
    return A * excess_log_ratio((A_hat - A) / A)


def _scatter_rows(values: Tensor, rows: Tensor | None, n_rows: int) -> Tensor:
    """Place per-active-row values into an (N,) zero vector (differentiable)."""
    if rows is None:
        return values
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_put((rows,), values)


def _active_rows(loss_mask: Tensor) -> Tensor | None:
    """Indices of the loss rows, or None when every row is one (then nothing is gathered)."""
    return None if bool(loss_mask.all()) else loss_mask.nonzero().squeeze(1)


def _reference(logits: Tensor, targets: Tensor, A: Tensor, A_hat: Tensor, mask_token_id: int | None,
               loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    return _reference_rows(logits, targets, A, A_hat, mask_token_id, _active_rows(loss_mask))


def _reference_rows(logits: Tensor, targets: Tensor, A: Tensor, A_hat: Tensor, mask_token_id: int | None,
                    rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """The reference on the rows ``rows`` (None: all), without host synchronisation, so that
    ``torch.compile`` sees one graph."""
    dtype = _compute_dtype(logits, A, A_hat)
    n_rows = logits.shape[0]
    pick = (lambda v: v) if rows is None else (lambda v: v.index_select(0, rows))
    x = pick(logits).to(dtype)
    if mask_token_id is not None:
        column = torch.tensor([mask_token_id], device=x.device)
        # Fill in place when x is already a private copy (dtype cast or row gather): saves one (N, V) buffer.
        x = x.index_fill(1, column, float("-inf")) if x.data_ptr() == logits.data_ptr() else \
            x.index_fill_(1, column, float("-inf"))
    lse = torch.logsumexp(x, dim=1)
    nll = lse - x.gather(1, pick(targets).unsqueeze(1)).squeeze(1)
    a, a_hat = pick(A).to(dtype), pick(A_hat).to(dtype)
    return _scatter_rows(a * nll, rows, n_rows), _scatter_rows(_velocity_term(a, a_hat), rows, n_rows)


def _reference_partials(logits: Tensor, targets: Tensor, vocab_start: int, mask_token_id: int | None,
                        loss_mask: Tensor) -> VocabPartials:
    dtype = _compute_dtype(logits)
    n_rows, n_cols = logits.shape
    rows = _active_rows(loss_mask)
    pick = (lambda v: v) if rows is None else (lambda v: v.index_select(0, rows))
    x = pick(logits).to(dtype)
    if mask_token_id is not None and vocab_start <= mask_token_id < vocab_start + n_cols:
        x = x.index_fill(1, torch.tensor([mask_token_id - vocab_start], device=x.device), float("-inf"))
    local_max = x.detach().amax(dim=1)
    shift = torch.where(torch.isfinite(local_max), local_max, torch.zeros_like(local_max))
    sumexp = torch.exp(x - shift.unsqueeze(1)).sum(dim=1)
    col = pick(targets) - vocab_start
    in_slice = (col >= 0) & (col < n_cols)
    picked = x.gather(1, col.clamp(0, n_cols - 1).unsqueeze(1)).squeeze(1)
    target_logit = torch.where(in_slice, picked, torch.zeros_like(picked))
    return VocabPartials(_scatter_rows(local_max, rows, n_rows), _scatter_rows(sumexp, rows, n_rows),
                         _scatter_rows(target_logit, rows, n_rows))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

def velocity_loss(logits: Tensor, targets: Tensor, A: Tensor, A_hat: Tensor, *, mask_token_id: int | None,
                  loss_mask: Tensor | None = None, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-token (l_main, l_velocity), each (N,) float32, zero where ``loss_mask`` is False.

    logits (N, V) bf16/fp16/fp32; targets (N,) int64 in [0, V) on loss rows and never the mask
    token; A, A_hat (N,) positive (cast to float32); loss_mask (N,) bool or None (all rows).
    ``mask_token_id`` is the column SUBS removes from the softmax (None: no column removed).
    Differentiable w.r.t. logits, A and A_hat. ``backend``: "auto" (Triton on CUDA, else the
    reference), "torch" or "triton". Inputs are checked with one host synchronisation.
    """
    fn = "velocity_loss"
    loss_mask = _prepare_rows(fn, logits, targets, loss_mask, mask_token_id, A, A_hat)
    if resolve_backend(backend, logits, targets, A, A_hat, kernel=fn) == "torch":
        return _reference(logits, targets, A.float(), A_hat.float(), mask_token_id, loss_mask)
    from kernels._velocity_loss_triton import velocity_loss_triton

    return velocity_loss_triton(_row_major(logits), targets.contiguous(), A.float().contiguous(),
                                A_hat.float().contiguous(), loss_mask.contiguous().view(torch.uint8),
                                -1 if mask_token_id is None else mask_token_id)


def velocity_loss_reference(logits: Tensor, targets: Tensor, A: Tensor, A_hat: Tensor, *,
                            mask_token_id: int | None, loss_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """PyTorch form of :func:`velocity_loss` (autograd does the backward).

    Computes in float32, or in float64 when logits, A or A_hat are float64. Only loss rows are
    gathered and pushed through the log-softmax.
    """
    loss_mask = _prepare_rows("velocity_loss_reference", logits, targets, loss_mask, mask_token_id, A, A_hat)
    return _reference(logits, targets, A, A_hat, mask_token_id, loss_mask)


def vocab_parallel_partials(logits_slice: Tensor, targets: Tensor, *, vocab_start: int, mask_token_id: int | None,
                            loss_mask: Tensor | None = None, backend: str = "auto") -> VocabPartials:
    """Per-row (local_max, local_sumexp, local_target_logit) of a vocabulary slice, each (N,) float32.

    ``logits_slice`` (N, V_local) holds global vocabulary ids [vocab_start, vocab_start + V_local);
    ``targets`` and ``mask_token_id`` are global ids. local_sumexp is relative to local_max and is
    differentiable w.r.t. the slice, as is local_target_logit; see the module docstring for how
    ranks combine them.
    """
    fn = "vocab_parallel_partials"
    if not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"{fn}: vocab_start must be an int >= 0, got {vocab_start!r}")
    loss_mask = _prepare_rows(fn, logits_slice, targets, loss_mask, mask_token_id, vocab_start=vocab_start)
    if resolve_backend(backend, logits_slice, targets, kernel=fn) == "torch":
        return _reference_partials(logits_slice, targets, vocab_start, mask_token_id, loss_mask)
    from kernels._velocity_loss_triton import vocab_partials_triton

    return VocabPartials(*vocab_partials_triton(_row_major(logits_slice), targets.contiguous(),
                                                loss_mask.contiguous().view(torch.uint8), vocab_start,
                                                -1 if mask_token_id is None else mask_token_id))


def rescale_sumexp(local_sumexp: Tensor, local_max: Tensor, global_max: Tensor) -> Tensor:
    """local_sumexp * exp(local_max - global_max): a slice's sum-exp relative to the global max.

    A slice with nothing in it (local_max = -inf) contributes 0; rows where even the global max is
    -inf (outside the loss mask every slice reports max 0, so this only happens for a vocabulary
    that is nothing but the mask token) contribute 0 as well instead of NaN.
    """
    scale = torch.exp(local_max - global_max)
    return local_sumexp * torch.where(torch.isnan(scale), torch.zeros_like(scale), scale)


def reduce_vocab_partials(partials: Sequence[VocabPartials]) -> VocabPartials:
    """In-process equivalent of the all-reduce protocol: max, sum of rescaled sum-exp, sum of targets."""
    if len(partials) == 0:
        raise ValueError("reduce_vocab_partials: got no partials")
    global_max = torch.stack([p.local_max for p in partials]).amax(dim=0)
    sumexp = sum(rescale_sumexp(p.local_sumexp, p.local_max, global_max) for p in partials)
    target_logit = sum(p.local_target_logit for p in partials)
    return VocabPartials(global_max, sumexp, target_logit)


def combine_vocab_parallel(partials: VocabPartials | Sequence[VocabPartials], A: Tensor, A_hat: Tensor, *,
                           loss_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(l_main, l_velocity) from vocab-parallel partials, equal to :func:`velocity_loss` on the full logits.

    ``partials``: either one :class:`VocabPartials` that is already reduced over all slices
    (global max, all-reduced rescaled sum-exp, all-reduced target logit), or a sequence of
    per-slice partials to reduce here. ``loss_mask`` must be the one the partials were built with.
    Elementwise over N, so plain PyTorch on every backend.
    """
    fn = "combine_vocab_parallel"
    total = partials if isinstance(partials, VocabPartials) else reduce_vocab_partials(list(partials))
    n_rows = total.local_max.shape[0]
    if loss_mask is None:
        loss_mask = torch.ones(n_rows, dtype=torch.bool, device=total.local_max.device)
    for name, value in (("A", A), ("A_hat", A_hat), ("loss_mask", loss_mask),
                        ("local_sumexp", total.local_sumexp), ("local_target_logit", total.local_target_logit)):
        _check_row_vector(name, value, n_rows, fn)
    if loss_mask.dtype != torch.bool:
        raise TypeError(f"{fn}: loss_mask must be bool, got {loss_mask.dtype}")
    dtype = _compute_dtype(total.local_sumexp, A, A_hat)
    one = torch.ones((), dtype=dtype, device=A.device)
    # Off the loss mask the partials are (0, 0, 0); substitute harmless values so that neither the
    # value nor the gradient of the masked-out branch is inf or NaN.
    a = torch.where(loss_mask, A.to(dtype), one)
    a_hat = torch.where(loss_mask, A_hat.to(dtype), one)
    sumexp = torch.where(loss_mask, total.local_sumexp.to(dtype), one)
    global_max = torch.where(loss_mask, total.local_max.to(dtype), 0 * one)
    nll = (global_max - total.local_target_logit.to(dtype)) + torch.log1p(sumexp - 1)
    zero = torch.zeros((), dtype=dtype, device=A.device)
    return torch.where(loss_mask, a * nll, zero), torch.where(loss_mask, _velocity_term(a, a_hat), zero)


def _row_major(logits: Tensor) -> Tensor:
    """The kernels walk each row with unit stride; copy only if the layout demands it."""
    return logits if logits.stride(-1) == 1 else logits.contiguous()
