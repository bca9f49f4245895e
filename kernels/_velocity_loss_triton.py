"""Triton kernels for the velocity-weighted masked cross-entropy and its vocab-parallel partials.

One program handles one row (token). The forward reads the row's logits once, in vocabulary
chunks, keeping a running max and a running sum of exp relative to it (online softmax), so the
(N, V) log-softmax is never materialised. The backward reads the row once more and writes the
logits' gradient once. Rows outside the loss mask skip the vocabulary loop entirely; their
backward only writes zeros.

The public entry points, argument checks and PyTorch references live in
``kernels/velocity_loss.py``; this module is imported only when a Triton backend runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _tl_math
from kernels.dispatch import empty_output, next_power_of_2, quiet_interpreter, triton_is_interpreted

_NEG_BIG = tl.constexpr(-1.0e30)  # running-max start: finite, so exp(m_old - m_new) never sees (-inf) - (-inf)


def launch_config(n_cols: int, device: torch.device, block: int | None = None) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of ``n_cols`` logits.

    GPU: a hand-written table (no autotuning: the interpreter cannot run it and a fixed table keeps
    runs reproducible). 4,096 columns per chunk with 8 warps gives each thread 16 elements (two
    16-byte loads of bf16) per iteration; a 50k vocabulary takes 13 iterations. Interpreter: as
    wide as possible, since its cost is per loop iteration.
    """
    if block is not None:
        if block < 16 or block & (block - 1):
            raise ValueError(f"block must be a power of two >= 16, got {block}")
        return block, 4
    if device.type != "cuda" and triton_is_interpreted():
        return min(next_power_of_2(n_cols), 1 << 16), 1
    block = min(next_power_of_2(n_cols), 4096)
    return max(block, 16), (4 if block <= 1024 else 8)


@triton.jit
def _row_logit_stats(row_ptr, n_cols, target_col, excluded_col, BLOCK: tl.constexpr):
    """Over columns [0, n_cols) except ``excluded_col``: running max m, sum of exp(x - m), and
    the logit at ``target_col`` (0 when the target lies outside the row)."""
    offs = tl.arange(0, BLOCK)
    m = tl.full([], _NEG_BIG, tl.float32)
    s = tl.zeros([], tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        x = tl.where(cols == excluded_col, -float("inf"), x)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    has_target = (target_col >= 0) & (target_col < n_cols)
    z = tl.load(row_ptr + tl.where(has_target, target_col, 0), mask=has_target, other=0.0).to(tl.float32)
    return m, s, z


@triton.jit
def _store_row_grad(x_row_ptr, g_row_ptr, n_cols, coef_p, ref, coef_t, target_col, excluded_col,
                    BLOCK: tl.constexpr):
    """g[v] = coef_p * exp(x[v] - ref) + coef_t * [v == target_col], and 0 at ``excluded_col``."""
    offs = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        in_row = cols < n_cols
        x = tl.load(x_row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        g = coef_p * tl.exp(x - ref) + tl.where(cols == target_col, coef_t, 0.0)
        g = tl.where(cols == excluded_col, 0.0, g)
        tl.store(g_row_ptr + cols, g.to(g_row_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _store_row_zeros(g_row_ptr, n_cols, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        tl.store(g_row_ptr + cols, tl.zeros([BLOCK], tl.float32).to(g_row_ptr.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def _loss_fwd_kernel(logits_ptr, stride_row, targets_ptr, a_ptr, a_hat_ptr, active_ptr,
                     l_main_ptr, l_vel_ptr, lse_ptr, nll_ptr, n_cols, excluded_col,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    active = tl.load(active_ptr + row) != 0
    l_main = tl.zeros([], tl.float32)
    l_vel = tl.zeros([], tl.float32)
    lse = tl.zeros([], tl.float32)
    nll = tl.zeros([], tl.float32)
    if active:
        target = tl.load(targets_ptr + row)
        m, s, z = _row_logit_stats(logits_ptr + row * stride_row, n_cols, target, excluded_col, BLOCK)
        # s >= 1 (the max contributes exp(0)); log1p(s - 1) keeps nll accurate when it is tiny.
        log_s = _tl_math.log1p(s - 1.0)
        lse = m + log_s
        nll = (m - z) + log_s
        a = tl.load(a_ptr + row)
        a_hat = tl.load(a_hat_ptr + row)
        l_main = a * nll
        l_vel = a * _tl_math.excess_log_ratio((a_hat - a) / a)
    tl.store(l_main_ptr + row, l_main)
    tl.store(l_vel_ptr + row, l_vel)
    tl.store(lse_ptr + row, lse)
    tl.store(nll_ptr + row, nll)


@triton.jit
def _loss_bwd_kernel(logits_ptr, stride_row, grad_logits_ptr, stride_grad_row, targets_ptr, active_ptr,
                     a_ptr, a_hat_ptr, lse_ptr, nll_ptr, g_main_ptr, g_vel_ptr, grad_a_ptr, grad_a_hat_ptr,
                     n_cols, excluded_col, BLOCK: tl.constexpr, WRITE_LOGITS_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    active = tl.load(active_ptr + row) != 0
    grad_a = tl.zeros([], tl.float32)
    grad_a_hat = tl.zeros([], tl.float32)
    if active:
        a = tl.load(a_ptr + row)
        a_hat = tl.load(a_hat_ptr + row)
        g_main = tl.load(g_main_ptr + row)
        g_vel = tl.load(g_vel_ptr + row)
        # d l_main / dA = nll;  d l_vel / dA = log(A / A_hat);  d l_vel / dA_hat = 1 - A / A_hat.
        grad_a = g_main * tl.load(nll_ptr + row) - g_vel * _tl_math.log1p((a_hat - a) / a)
        grad_a_hat = g_vel * ((a_hat - a) / a_hat)
        if WRITE_LOGITS_GRAD:
            # d l_main / dx_v = A (softmax_v - [v == target]); the excluded mask column gets 0.
            coef = g_main * a
            _store_row_grad(logits_ptr + row * stride_row, grad_logits_ptr + row * stride_grad_row, n_cols,
                            coef, tl.load(lse_ptr + row), -coef, tl.load(targets_ptr + row), excluded_col, BLOCK)
    else:
        if WRITE_LOGITS_GRAD:
            _store_row_zeros(grad_logits_ptr + row * stride_grad_row, n_cols, BLOCK)
    tl.store(grad_a_ptr + row, grad_a)
    tl.store(grad_a_hat_ptr + row, grad_a_hat)


@triton.jit
def _partials_fwd_kernel(logits_ptr, stride_row, targets_ptr, active_ptr, max_ptr, sumexp_ptr, target_logit_ptr,
                         n_cols, vocab_start, excluded_global, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    active = tl.load(active_ptr + row) != 0
    m_out = tl.zeros([], tl.float32)
    s_out = tl.zeros([], tl.float32)
    z_out = tl.zeros([], tl.float32)
    if active:
        target_col = tl.load(targets_ptr + row) - vocab_start
        m, s, z = _row_logit_stats(logits_ptr + row * stride_row, n_cols, target_col,
                                   excluded_global - vocab_start, BLOCK)
        m_out = tl.where(s > 0.0, m, -float("inf"))  # a slice holding only the mask token
        s_out = s
        z_out = z
    tl.store(max_ptr + row, m_out)
    tl.store(sumexp_ptr + row, s_out)
    tl.store(target_logit_ptr + row, z_out)


@triton.jit
def _partials_bwd_kernel(logits_ptr, stride_row, grad_ptr, stride_grad_row, targets_ptr, active_ptr, max_ptr,
                         g_sumexp_ptr, g_target_ptr, n_cols, vocab_start, excluded_global, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    active = tl.load(active_ptr + row) != 0
    if active:
        m = tl.load(max_ptr + row)
        ref = tl.where(m == -float("inf"), 0.0, m)
        _store_row_grad(logits_ptr + row * stride_row, grad_ptr + row * stride_grad_row, n_cols,
                        tl.load(g_sumexp_ptr + row), ref, tl.load(g_target_ptr + row),
                        tl.load(targets_ptr + row) - vocab_start, excluded_global - vocab_start, BLOCK)
    else:
        _store_row_zeros(grad_ptr + row * stride_grad_row, n_cols, BLOCK)


def _grad_or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Autograd passes None for an output that no loss used; the kernels want a dense vector."""
    if grad is None:
        return torch.zeros_like(like, dtype=torch.float32)
    return grad.to(torch.float32).contiguous()


class VelocityLossFunction(torch.autograd.Function):
    """(logits, targets, A, A_hat, active) -> (l_main, l_velocity), Triton forward and backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, A: torch.Tensor, A_hat: torch.Tensor,
                active: torch.Tensor, excluded_col: int, block: int | None):
        n_rows, n_cols = logits.shape
        block_v, num_warps = launch_config(n_cols, logits.device, block)
        out = [empty_output((n_rows,), torch.float32, logits.device) for _ in range(4)]
        l_main, l_vel, lse, nll = out
        if n_rows:
            with quiet_interpreter(logits.device):
                _loss_fwd_kernel[(n_rows,)](logits, logits.stride(0), targets, A, A_hat, active, l_main, l_vel,
                                            lse, nll, n_cols, excluded_col, BLOCK=block_v, num_warps=num_warps)
        ctx.save_for_backward(logits, targets, A, A_hat, active, lse, nll)
        ctx.excluded_col, ctx.block_v, ctx.num_warps = excluded_col, block_v, num_warps
        ctx.set_materialize_grads(False)
        return l_main, l_vel

    @staticmethod
    def backward(ctx, g_main: torch.Tensor | None, g_vel: torch.Tensor | None):
        logits, targets, A, A_hat, active, lse, nll = ctx.saved_tensors
        n_rows, n_cols = logits.shape
        write_logits = ctx.needs_input_grad[0]
        g_main = _grad_or_zeros(g_main, A)
        g_vel = _grad_or_zeros(g_vel, A)
        grad_logits = empty_output(logits.shape, logits.dtype, logits.device) if write_logits else logits
        grad_a = empty_output((n_rows,), torch.float32, A.device)
        grad_a_hat = empty_output((n_rows,), torch.float32, A.device)
        if n_rows:
            with quiet_interpreter(logits.device):
                _loss_bwd_kernel[(n_rows,)](logits, logits.stride(0), grad_logits, grad_logits.stride(0), targets,
                                            active, A, A_hat, lse, nll, g_main, g_vel, grad_a, grad_a_hat, n_cols,
                                            ctx.excluded_col, BLOCK=ctx.block_v, WRITE_LOGITS_GRAD=write_logits,
                                            num_warps=ctx.num_warps)
        return (grad_logits if write_logits else None, None,
                grad_a if ctx.needs_input_grad[2] else None,
                grad_a_hat if ctx.needs_input_grad[3] else None, None, None, None)


class VocabPartialsFunction(torch.autograd.Function):
    """logits slice -> (local max, sum exp relative to it, target logit); the max is not differentiable.

    Treating the max as a constant is exact: the log-sum-exp the caller builds does not depend on
    which reference point each slice used, so d(sumexp)/dx_v = exp(x_v - local_max) is the whole
    story, and the chain rule through the caller's combine gives A (softmax_v - [v == target]).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, active: torch.Tensor, vocab_start: int,
                excluded_global: int, block: int | None):
        n_rows, n_cols = logits.shape
        block_v, num_warps = launch_config(n_cols, logits.device, block)
        local_max, sumexp, target_logit = (empty_output((n_rows,), torch.float32, logits.device) for _ in range(3))
        if n_rows:
            with quiet_interpreter(logits.device):
                _partials_fwd_kernel[(n_rows,)](logits, logits.stride(0), targets, active, local_max, sumexp,
                                                target_logit, n_cols, vocab_start, excluded_global,
                                                BLOCK=block_v, num_warps=num_warps)
        ctx.mark_non_differentiable(local_max)
        ctx.save_for_backward(logits, targets, active, local_max)
        ctx.vocab_start, ctx.excluded_global = vocab_start, excluded_global
        ctx.block_v, ctx.num_warps = block_v, num_warps
        ctx.set_materialize_grads(False)
        return local_max, sumexp, target_logit

    @staticmethod
    def backward(ctx, _g_max, g_sumexp: torch.Tensor | None, g_target: torch.Tensor | None):
        logits, targets, active, local_max = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        n_rows, n_cols = logits.shape
        g_sumexp = _grad_or_zeros(g_sumexp, local_max)
        g_target = _grad_or_zeros(g_target, local_max)
        grad = empty_output(logits.shape, logits.dtype, logits.device)
        if n_rows:
            with quiet_interpreter(logits.device):
                _partials_bwd_kernel[(n_rows,)](logits, logits.stride(0), grad, grad.stride(0), targets, active,
                                                local_max, g_sumexp, g_target, n_cols, ctx.vocab_start,
                                                ctx.excluded_global, BLOCK=ctx.block_v, num_warps=ctx.num_warps)
        return grad, None, None, None, None, None


def velocity_loss_triton(logits: torch.Tensor, targets: torch.Tensor, A: torch.Tensor, A_hat: torch.Tensor,
                         active: torch.Tensor, excluded_col: int, *, block: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked inputs in, (l_main, l_velocity) out. ``active`` is a uint8 (N,) view of the loss mask;
    ``excluded_col`` is the mask token's column or -1. ``block`` overrides the chunk width (tests)."""
    return VelocityLossFunction.apply(logits, targets, A, A_hat, active, excluded_col, block)


def vocab_partials_triton(logits: torch.Tensor, targets: torch.Tensor, active: torch.Tensor, vocab_start: int,
                          excluded_global: int, *, block: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked inputs in, (local_max, local_sumexp, local_target_logit) out; see ``VocabPartialsFunction``."""
    return VocabPartialsFunction.apply(logits, targets, active, vocab_start, excluded_global, block)
