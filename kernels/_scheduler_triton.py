"""Triton kernels for the LoMDM forward scheduler: NormSig exponents, alpha, velocity and log q.

One program handles one sequence row. The forward first sums sigmoid(g) over the row's valid
positions (NormSig's mean), then writes k, alpha = 1 - t^k and velocity = k / t (from log t and 1/t,
formed per row on the host in float64), then accumulates
log q for each of the K masks. The backward recomputes the same quantities, first to sum the
row's dL/dk (the mean couples every position), then to write dL/dg. Everything is recomputed from
g rather than stored: the row is tiny next to the logits, and the kernel is bound by launches and
memory, not arithmetic.

Public entry points, checks and the PyTorch reference live in ``kernels/scheduler.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _tl_math
from kernels.dispatch import empty_output, next_power_of_2, quiet_interpreter, triton_is_interpreted


def launch_config(seq_len: int, device: torch.device, block: int | None = None) -> tuple[int, int]:
    """(BLOCK_L, num_warps) for a row of ``seq_len`` positions; a hand-written table (no autotune).

    A whole 1,024-long row fits one block (4 warps, 8 elements a thread); longer rows loop in
    chunks of 2,048 with 8 warps. The interpreter takes the widest block, its cost being per step.
    """
    if block is not None:
        if block < 16 or block & (block - 1):
            raise ValueError(f"block must be a power of two >= 16, got {block}")
        return block, 4
    if device.type != "cuda" and triton_is_interpreted():
        return min(next_power_of_2(seq_len), 1 << 16), 1
    block = max(16, min(next_power_of_2(seq_len), 2048))
    return block, (4 if block <= 1024 else 8)


@triton.jit
def _load_sigmoid(g_row_ptr, valid_row_ptr, cols, seq_len):
    """sigmoid(g) and validity at ``cols`` (positions past the row end count as padding)."""
    in_row = cols < seq_len
    g = tl.load(g_row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    valid = (tl.load(valid_row_ptr + cols, mask=in_row, other=0) != 0) & in_row
    return 1.0 / (1.0 + tl.exp(-g)), valid


@triton.jit
def _exponents(g_row_ptr, valid_row_ptr, cols, seq_len, mean, c1, c2, k_min):
    """sigmoid(g), validity, the unclamped and the final exponent at ``cols``."""
    sig, valid = _load_sigmoid(g_row_ptr, valid_row_ptr, cols, seq_len)
    k_raw = c1 + c2 * (sig - mean)
    k = tl.where(valid, tl.maximum(k_raw, k_min), c1)
    return sig, valid, k_raw, k


@triton.jit
def _sigmoid_mean(g_row_ptr, valid_row_ptr, seq_len, BLOCK: tl.constexpr):
    """NormSig's mean of sigmoid(g) over the row's valid positions (0 for an all-padding row)."""
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([], tl.float32)
    count = tl.zeros([], tl.float32)
    for start in range(0, seq_len, BLOCK):
        sig, valid = _load_sigmoid(g_row_ptr, valid_row_ptr, start + offs, seq_len)
        total += tl.sum(tl.where(valid, sig, 0.0), axis=0)
        count += tl.sum(valid.to(tl.float32), axis=0)
    return total / tl.maximum(count, 1.0)


@triton.jit
def _schedule_fwd_kernel(g_ptr, valid_ptr, log_t_ptr, inv_t_ptr, masks_ptr, k_ptr, alpha_ptr, velocity_ptr, log_q_ptr, mean_ptr,
                         seq_len, n_rows, n_masks, stride_g, stride_valid, stride_mask_k, stride_mask_b, stride_out,
                         c1, c2, k_min, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    g_row = g_ptr + row * stride_g
    valid_row = valid_ptr + row * stride_valid
    log_t = tl.load(log_t_ptr + row)
    inv_t = tl.load(inv_t_ptr + row)
    mean = _sigmoid_mean(g_row, valid_row, seq_len, BLOCK)
    tl.store(mean_ptr + row, mean)
    for start in range(0, seq_len, BLOCK):
        cols = start + offs
        sig, valid, k_raw, k = _exponents(g_row, valid_row, cols, seq_len, mean, c1, c2, k_min)
        in_row = cols < seq_len
        tl.store(k_ptr + row * stride_out + cols, k, mask=in_row)
        tl.store(alpha_ptr + row * stride_out + cols, _tl_math.neg_expm1(k * log_t), mask=in_row)
        tl.store(velocity_ptr + row * stride_out + cols, k * inv_t, mask=in_row)
    for j in range(0, n_masks):
        mask_row = masks_ptr + j * stride_mask_k + row * stride_mask_b
        log_q = tl.zeros([], tl.float32)
        for start in range(0, seq_len, BLOCK):
            cols = start + offs
            sig, valid, k_raw, k = _exponents(g_row, valid_row, cols, seq_len, mean, c1, c2, k_min)
            masked = tl.load(mask_row + cols, mask=cols < seq_len, other=0) != 0
            x = k * log_t
            # where(), not a product: log(1 - t^k) is -inf at t = 1, and 0 * -inf would be NaN.
            term = tl.where(masked, x, _tl_math.log1mexp(tl.where(masked, -1.0, x)))
            log_q += tl.sum(tl.where(valid, term, 0.0), axis=0)
        tl.store(log_q_ptr + j * n_rows + row, log_q)


@triton.jit
def _dloss_dk(g_row, valid_row, cols, seq_len, mean, c1, c2, k_min, inv_t, log_t, row, n_rows, n_masks,
              gk_row, ga_row, gv_row, masks_ptr, stride_mask_k, stride_mask_b, g_log_q_ptr,
              HAS_GK: tl.constexpr, HAS_GA: tl.constexpr, HAS_GV: tl.constexpr, HAS_GQ: tl.constexpr):
    """dL/dk_raw at ``cols`` (zero at padding and where the clamp at k_min is active)."""
    sig, valid, k_raw, k = _exponents(g_row, valid_row, cols, seq_len, mean, c1, c2, k_min)
    in_row = cols < seq_len
    x = k * log_t
    dk = tl.zeros_like(k)
    if HAS_GK:
        dk += tl.load(gk_row + cols, mask=in_row, other=0.0)
    if HAS_GA:
        # d(1 - t^k)/dk = -t^k log t
        dk += tl.load(ga_row + cols, mask=in_row, other=0.0) * (-tl.exp(x) * log_t)
    if HAS_GV:
        dk += tl.load(gv_row + cols, mask=in_row, other=0.0) * inv_t
    if HAS_GQ:
        # d log(1 - t^k)/dk = -log t * t^k / (1 - t^k) = -log t * exp(x - log(1 - e^x)); 0 at t = 1,
        # where log(1 - t^k) is -inf and has no useful gradient (the reference agrees).
        x_open = tl.where(x < 0.0, x, -1.0)
        d_log1m = tl.where(x < 0.0, -log_t * tl.exp(x_open - _tl_math.log1mexp(x_open)), 0.0)
        for j in range(0, n_masks):
            masked = tl.load(masks_ptr + j * stride_mask_k + row * stride_mask_b + cols, mask=in_row, other=0) != 0
            dk += tl.load(g_log_q_ptr + j * n_rows + row) * tl.where(masked, log_t, d_log1m)
    # torch.clamp passes the gradient where k_raw >= k_min; padding positions hold the constant c1.
    return tl.where(valid & (k_raw >= k_min), dk, 0.0), sig, valid


@triton.jit
def _schedule_bwd_kernel(g_ptr, valid_ptr, log_t_ptr, inv_t_ptr, masks_ptr, mean_ptr, gk_ptr, ga_ptr, gv_ptr, g_log_q_ptr,
                         grad_g_ptr, seq_len, n_rows, n_masks, stride_g, stride_valid, stride_mask_k, stride_mask_b,
                         stride_grad_out, stride_grad_g, c1, c2, k_min, BLOCK: tl.constexpr,
                         HAS_GK: tl.constexpr, HAS_GA: tl.constexpr, HAS_GV: tl.constexpr, HAS_GQ: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    g_row = g_ptr + row * stride_g
    valid_row = valid_ptr + row * stride_valid
    log_t = tl.load(log_t_ptr + row)
    inv_t = tl.load(inv_t_ptr + row)
    mean = tl.load(mean_ptr + row)
    gk_row = gk_ptr + row * stride_grad_out
    ga_row = ga_ptr + row * stride_grad_out
    gv_row = gv_ptr + row * stride_grad_out
    # Pass 1: the row's sum of dL/dk_raw and its valid count (NormSig's mean couples all positions).
    total = tl.zeros([], tl.float32)
    count = tl.zeros([], tl.float32)
    for start in range(0, seq_len, BLOCK):
        cols = start + offs
        u, sig, valid = _dloss_dk(g_row, valid_row, cols, seq_len, mean, c1, c2, k_min, inv_t, log_t, row, n_rows,
                                  n_masks, gk_row, ga_row, gv_row, masks_ptr, stride_mask_k, stride_mask_b,
                                  g_log_q_ptr, HAS_GK, HAS_GA, HAS_GV, HAS_GQ)
        total += tl.sum(u, axis=0)
        count += tl.sum(valid.to(tl.float32), axis=0)
    mean_u = total / tl.maximum(count, 1.0)
    # Pass 2: dL/dg_j = c2 * (u_j - [valid_j] * mean(u)) * sigmoid'(g_j).
    for start in range(0, seq_len, BLOCK):
        cols = start + offs
        u, sig, valid = _dloss_dk(g_row, valid_row, cols, seq_len, mean, c1, c2, k_min, inv_t, log_t, row, n_rows,
                                  n_masks, gk_row, ga_row, gv_row, masks_ptr, stride_mask_k, stride_mask_b,
                                  g_log_q_ptr, HAS_GK, HAS_GA, HAS_GV, HAS_GQ)
        grad = c2 * (u - tl.where(valid, mean_u, 0.0)) * sig * (1.0 - sig)
        tl.store(grad_g_ptr + row * stride_grad_g + cols, grad.to(grad_g_ptr.dtype.element_ty), mask=cols < seq_len)


class LoMDMScheduleFunction(torch.autograd.Function):
    """(g, log_t, inv_t, valid, masks) -> (k, alpha, velocity, log_q) with Triton forward and backward."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, log_t: torch.Tensor, inv_t: torch.Tensor, valid: torch.Tensor,
                masks: torch.Tensor, c1: float,
                c2: float, k_min: float, block: int | None):
        n_rows, seq_len = g.shape
        n_masks = masks.shape[0]
        block_l, num_warps = launch_config(seq_len, g.device, block)
        k, alpha, velocity = (empty_output((n_rows, seq_len), torch.float32, g.device) for _ in range(3))
        log_q = empty_output((n_masks, n_rows), torch.float32, g.device)
        mean = empty_output((n_rows,), torch.float32, g.device)
        if n_rows:
            with quiet_interpreter(g.device):
                _schedule_fwd_kernel[(n_rows,)](g, valid, log_t, inv_t, masks, k, alpha, velocity, log_q, mean, seq_len,
                                                n_rows, n_masks, g.stride(0), valid.stride(0), masks.stride(0),
                                                masks.stride(1), k.stride(0), c1, c2, k_min, BLOCK=block_l,
                                                num_warps=num_warps)
        ctx.save_for_backward(g, log_t, inv_t, valid, masks, mean)
        ctx.constants = (c1, c2, k_min, block_l, num_warps)
        ctx.set_materialize_grads(False)
        return k, alpha, velocity, log_q

    @staticmethod
    def backward(ctx, gk, ga, gv, g_log_q):
        g, log_t, inv_t, valid, masks, mean = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        c1, c2, k_min, block_l, num_warps = ctx.constants
        n_rows, seq_len = g.shape
        dense = [None if x is None else x.to(torch.float32).contiguous() for x in (gk, ga, gv, g_log_q)]
        placeholder = mean  # any float32 pointer; never read when its HAS_* flag is False
        gk, ga, gv, g_log_q = (placeholder if x is None else x for x in dense)
        out_stride = next((x.stride(0) for x in dense[:3] if x is not None), 0)
        grad_g = empty_output(g.shape, g.dtype, g.device)
        if n_rows:
            with quiet_interpreter(g.device):
                _schedule_bwd_kernel[(n_rows,)](
                    g, valid, log_t, inv_t, masks, mean, gk, ga, gv, g_log_q, grad_g, seq_len, n_rows, masks.shape[0],
                    g.stride(0), valid.stride(0), masks.stride(0), masks.stride(1), out_stride, grad_g.stride(0),
                    c1, c2, k_min, BLOCK=block_l, HAS_GK=dense[0] is not None, HAS_GA=dense[1] is not None,
                    HAS_GV=dense[2] is not None, HAS_GQ=dense[3] is not None and masks.shape[0] > 0,
                    num_warps=num_warps)
        return grad_g, None, None, None, None, None, None, None, None


def lomdm_schedule_triton(g: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, masks: torch.Tensor, c1: float,
                          c2: float, k_min: float, *, block: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked inputs in (valid and masks as uint8 views, masks (K, B, L) with K possibly 0).

    log t and 1/t are formed here per row in float64 and handed to the kernel in float32, so a
    float64 ``t`` below float32's range still gives exact log q (1/t then saturates to inf, which
    only the velocity output sees). ``block`` overrides the chunk width (tests use it to cover
    multi-chunk rows)."""
    log_t, inv_t = row_time_terms(t)
    return LoMDMScheduleFunction.apply(g, log_t, inv_t, valid, masks, float(c1), float(c2), float(k_min), block)


def row_time_terms(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log t, 1 / t) as contiguous float32, computed in float64."""
    t64 = t.double()
    return torch.log(t64).float().contiguous(), (1.0 / t64).float().contiguous()
