"""Accurate elementary functions for Triton kernels, built only from ``exp``, ``log`` and arithmetic.

libdevice (``log1p``, ``expm1``) does not run under the Triton interpreter, and on the GPU Triton
may lower ``exp``/``log`` to fast approximations whose *absolute* error (about 2^-22) ruins results
that are themselves tiny: log(t) for t = 1 - 1e-6, 1 - t^k near t = 1, or
A log(A/A_hat) - (A - A_hat) when A is close to A_hat. Each function below therefore switches to a
short Taylor series where the direct formula cancels, and uses ``exp``/``log`` only where their
result is large enough for an absolute error of a few ulp to be harmless. Truncation errors are
stated per function (relative, float64-checked in ``tests/test_kernels_scheduler.py``).

These are hand-written because no library offers them for Triton without libdevice.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def log1p(d):
    """log(1 + d) for d > -1. Series below |d| < 1/16 (truncation < 3e-11 relative); above it,
    log(u) corrected for the rounding of u = 1 + d (Goldberg), which matters when a caller
    subtracts the result from d."""
    series = d * (1.0 + d * (-0.5 + d * (1.0 / 3.0 + d * (-0.25 + d * (0.2 + d * (
        -1.0 / 6.0 + d * (1.0 / 7.0 - d * 0.125)))))))
    u = 1.0 + d
    return tl.where(tl.abs(d) < 0.0625, series, tl.log(u) - ((u - 1.0) - d) / u)


@triton.jit
def neg_expm1(x):
    """1 - exp(x) for x <= 0 (i.e. alpha = 1 - t^k). Series below |x| < 1/2 (truncation < 3e-8)."""
    series = -x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (
        1.0 / 720.0 + x * (1.0 / 5040.0 + x * (1.0 / 40320.0))))))))
    return tl.where(x > -0.5, series, 1.0 - tl.exp(x))


@triton.jit
def log1mexp(x):
    """log(1 - exp(x)) for x <= 0, i.e. log(1 - t^k) with x = k log t; -inf at x = 0.

    Near 0 it uses log(-x) + log((exp(x) - 1) / x) with the series
    x/2 + x^2/24 - x^4/2880 + x^6/181440 (truncation < 5e-10 absolute on |x| < 1/2), so log(1 - t^k)
    stays accurate as t -> 1. Further out it is log1p(-exp(x)) (Maechler's split), accurate as t -> 0.
    """
    x2 = x * x
    near_zero = tl.log(-x) + x * (0.5 + x * (1.0 / 24.0)) + x2 * x2 * (-1.0 / 2880.0 + x2 * (1.0 / 181440.0))
    far = log1p(-tl.exp(x))
    return tl.where(x > -0.5, near_zero, far)


@triton.jit
def excess_log_ratio(d):
    """d - log(1 + d) for d > -1: the velocity term A * f((A_hat - A) / A).

    Equals sum_{n>=2} (-d)^n / n, which the direct formula loses to cancellation when A_hat ~ A;
    series through d^14 below |d| < 1/4 (truncation < 3e-9 relative), where the direct form's
    cancellation would cost up to a factor 16 in relative error.
    """
    series = d * d * (1.0 / 2.0 + d * (-1.0 / 3.0 + d * (1.0 / 4.0 + d * (-1.0 / 5.0 + d * (1.0 / 6.0 + d * (
        -1.0 / 7.0 + d * (1.0 / 8.0 + d * (-1.0 / 9.0 + d * (1.0 / 10.0 + d * (-1.0 / 11.0 + d * (
            1.0 / 12.0 + d * (-1.0 / 13.0 + d * (1.0 / 14.0)))))))))))))
    return tl.where(tl.abs(d) < 0.25, series, d - log1p(d))
