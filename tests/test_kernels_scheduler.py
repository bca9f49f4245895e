"""LoMDM scheduler: the reference against naive high-precision arithmetic, the stable helper
functions of the Triton kernels against mpmath, and the kernel (interpreter on CPU) against the
reference in float64, values and gradients, with padding and all/no-masked rows.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
import triton
import triton.language as tl

from kernels import _tl_math, dispatch
from kernels.dispatch import poison_outputs
from kernels.scheduler import lomdm_schedule, lomdm_schedule_reference, log1mexp

from helpers_kernels import rel_err

C1, C2 = 0.7, 0.65
# Triton runs on CUDA where there is one, else on CPU under the interpreter (tests/conftest.py).
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU = torch.device("cpu")
mpmath.mp.dps = 40




def naive_schedule(g, t, valid, c1, c2, masks, k_min):
    """Position-by-position with mpmath (40 digits): the definition, written out."""
    n_rows, seq_len = g.shape
    k = torch.zeros(n_rows, seq_len, dtype=torch.float64)
    alpha, velocity = torch.zeros_like(k), torch.zeros_like(k)
    log_q = torch.zeros(masks.shape[0], n_rows, dtype=torch.float64)
    for b in range(n_rows):
        tb = mpmath.mpf(float(t[b]))
        sig = [1 / (1 + mpmath.exp(-mpmath.mpf(float(g[b, i])))) for i in range(seq_len)]
        idx = [i for i in range(seq_len) if valid[b, i]]
        mean = sum(sig[i] for i in idx) / len(idx) if idx else 0
        for i in range(seq_len):
            kk = max(c1 + c2 * (sig[i] - mean), k_min) if valid[b, i] else mpmath.mpf(c1)
            k[b, i], alpha[b, i], velocity[b, i] = float(kk), float(1 - tb ** kk), float(kk / tb)
            for r in range(masks.shape[0]):
                if valid[b, i]:
                    log_q[r, b] += float(kk * mpmath.log(tb) if masks[r, b, i] else mpmath.log(1 - tb ** kk))
    return k, alpha, velocity, log_q


def make_inputs(gen, n_rows, seq_len, n_masks, *, t=None):
    g = torch.randn(n_rows, seq_len, generator=gen, dtype=torch.float64) * 2
    if t is None:
        t = torch.rand(n_rows, generator=gen, dtype=torch.float64) * 0.999 + 1e-3
    valid = torch.ones(n_rows, seq_len, dtype=torch.bool)
    valid[0, seq_len // 2:] = False          # padded tail
    if n_rows > 2:
        valid[2] = False                     # all padding
    masks = torch.rand(n_masks, n_rows, seq_len, generator=gen) < 0.5
    if n_rows > 3:
        masks[:, 1] = True                   # every position masked
        masks[:, 3] = False                  # none masked
    return g, t, valid, masks


# ------------------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------------------

def test_reference_matches_naive_high_precision(gen):
    g, t, valid, masks = make_inputs(gen, 5, 9, 2, t=torch.tensor([1e-3, 0.3, 0.9, 1 - 1e-6, 0.05],
                                                                  dtype=torch.float64))
    want = naive_schedule(g, t, valid, C1, C2, masks, 1e-4)
    got64 = lomdm_schedule_reference(g, t, valid, C1, C2, masks)
    for name, got, w in zip(["k", "alpha", "velocity", "log_q"], got64, want):
        assert rel_err(got, w) < 1e-12, name
    got32 = lomdm_schedule_reference(g.float(), t.float(), valid, C1, C2, masks)
    want32 = naive_schedule(g.float(), t.float(), valid, C1, C2, masks, 1e-4)  # at the fp32-rounded inputs
    for name, got, w in zip(["k", "alpha", "velocity", "log_q"], got32, want32):
        assert got.dtype == torch.float32
        assert rel_err(got, w) < 1e-5, name   # fp32: NormSig over 9 positions, a few elementwise roundings


def test_reference_gradient_matches_finite_differences(gen):
    g, t, valid, masks = make_inputs(gen, 4, 6, 2)
    g = g.requires_grad_()
    weights = [torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    weights.append(torch.randn(2, 4, generator=gen, dtype=torch.float64))

    def scalar(gg):
        out = lomdm_schedule_reference(gg, t, valid, 0.4, 1.0, masks, k_min=0.05)  # some k clamped
        return sum((o * w).sum() for o, w in zip(out, weights))

    assert torch.autograd.gradcheck(scalar, (g,), eps=1e-6, atol=1e-7)


def _check_extreme_times(t_value: float, runs: tuple[tuple[str, torch.device], ...]) -> None:
    n_rows = 27
    a = torch.linspace(-6.0, 6.0, n_rows)
    g = torch.stack([a, -a], dim=1)            # NormSig = +-(sigmoid(a) - 1/2): k spans [c1 - c2/2, c1 + c2/2]
    t32 = torch.full((n_rows,), t_value, dtype=torch.float32)
    valid = torch.ones(n_rows, 2, dtype=torch.bool)
    none_masked = torch.zeros(1, n_rows, 2, dtype=torch.bool)
    tm = mpmath.mpf(float(t32[0]))
    for backend, device in runs:
        out = lomdm_schedule(*(x.to(device) for x in (g, t32, valid)), C1, C2, none_masked.to(device),
                             backend=backend)
        kk = [[mpmath.mpf(float(v)) for v in row] for row in out.k.cpu()]
        exact_alpha = torch.tensor([[float(1 - tm ** v) for v in row] for row in kk], dtype=torch.float64)
        exact_log_q = torch.tensor([float(sum(mpmath.log(1 - tm ** v) for v in row)) for row in kk],
                                   dtype=torch.float64)
        # fp32 elementwise t^k and log(1 - t^k) at the fp32 k (the log_q row sums 2 of them): a few dozen
        # roundings at most, 1e-5 = 168 * 2^-24
        assert ((out.alpha.cpu().double() - exact_alpha).abs() / exact_alpha).max() < 1e-5, backend
        assert ((out.log_q[0].cpu().double() - exact_log_q).abs() / exact_log_q.abs()).max() < 1e-5, backend
        assert out.k.min() < C1 - 0.3 and out.k.max() > C1 + 0.3


@pytest.mark.parametrize("t_value", [1e-3, 1 - 1e-6])
def test_alpha_and_log1m_accurate_at_extreme_times(t_value):
    """t^k and log(1 - t^k) against 40-digit arithmetic at the fp32 t and the returned k, for the
    reference and the kernel; the naive fp32 formula misses badly at t = 1 - 1e-6 (the test bites)."""
    _check_extreme_times(t_value, (("torch", CPU), ("triton", TRITON_DEVICE)))
    if t_value > 0.5:  # fp32 1 - t^k keeps about two digits here, its log about three
        t32 = torch.tensor(t_value, dtype=torch.float32)
        naive_alpha = (1 - t32 ** torch.tensor(0.7)).item()
        exact_alpha = float(1 - mpmath.mpf(float(t32)) ** mpmath.mpf(0.7))
        assert abs(naive_alpha - exact_alpha) / exact_alpha > 1e-3
        assert abs(math.log(naive_alpha) - math.log(exact_alpha)) / abs(math.log(exact_alpha)) > 1e-4


def test_log1mexp_reference_and_gradient_edges():
    x = torch.tensor([-1e-9, -1e-3, -0.69, -0.7, -5.0, -40.0, 0.0], dtype=torch.float64, requires_grad=True)
    y = log1mexp(x)
    exact = torch.tensor([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(float(v))))) for v in x.detach()[:-1]],
                         dtype=torch.float64)
    assert ((y[:-1].detach() - exact).abs() / exact.abs()).max() < 1e-12
    assert y[-1].item() == float("-inf")
    y[:-1].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[-1] == 0


# ------------------------------------------------------------------------------------------------
# The kernels' elementary functions, run as Triton code
# ------------------------------------------------------------------------------------------------

@triton.jit
def _apply_helpers(x_ptr, d_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=-1.0)
    d = tl.load(d_ptr + offs, mask=ok, other=0.5)
    tl.store(out_ptr + offs, _tl_math.log1mexp(x), mask=ok)
    tl.store(out_ptr + n + offs, _tl_math.neg_expm1(x), mask=ok)
    tl.store(out_ptr + 2 * n + offs, _tl_math.excess_log_ratio(d), mask=ok)
    tl.store(out_ptr + 3 * n + offs, _tl_math.log1p(d), mask=ok)


def test_triton_elementary_functions_against_mpmath():
    """Every branch and both sides of every switch point, against 40-digit values at the fp32 inputs:
    x = k log t <= 0 for log(1 - e^x) and 1 - e^x; d > -1 for log(1 + d) and d - log(1 + d)."""
    xs = [-1e-7, -1e-4, -0.01, -0.3, -0.4999, -0.5, -0.5001, -0.9, -1.5, -2.7, -2.8, -4.0, -9.0, -20.0, -60.0]
    ds = [-0.99, -0.5, -0.1251, -0.125, -0.1249, -0.0626, -0.0625, -0.0624, -1e-3, -1e-6, 0.0, 2e-7, 1e-4,
          0.0624, 0.0625, 0.0626, 0.1249, 0.125, 0.1251, 0.7, 5.0, 1e3]
    n = max(len(xs), len(ds))
    x = torch.tensor(xs + [-1.0] * (n - len(xs)), dtype=torch.float32, device=TRITON_DEVICE)
    d = torch.tensor(ds + [0.5] * (n - len(ds)), dtype=torch.float32, device=TRITON_DEVICE)
    with poison_outputs():
        out = dispatch.empty_output((4 * n,), torch.float32, x.device)
    with dispatch.quiet_interpreter(x.device):  # the discarded series branch overflows at d = 1e3
        _apply_helpers[(1,)](x, d, out, n, BLOCK=dispatch.next_power_of_2(n))
    log1m, nexpm1, excess, log1p = out.view(4, n).double().cpu()
    mx = [mpmath.mpf(float(v)) for v in x]
    md = [mpmath.mpf(float(v)) for v in d]

    def check(got, exact, tol=2e-6):    # fp32 elementwise helpers: a few roundings, 2e-6 = 34 * 2^-24
        exact = torch.tensor([float(e) for e in exact], dtype=torch.float64)
        rel = torch.where(exact == 0, got.abs(), (got - exact).abs() / exact.abs())
        assert rel.max().item() < tol, rel

    check(log1m, [mpmath.log(1 - mpmath.exp(v)) for v in mx])
    check(nexpm1, [1 - mpmath.exp(v) for v in mx])
    check(excess, [v - mpmath.log(1 + v) for v in md])
    check(log1p, [mpmath.log(1 + v) for v in md])


# ------------------------------------------------------------------------------------------------
# The Triton kernel against the reference in float64
# ------------------------------------------------------------------------------------------------

def _run(fn, g, t, valid, masks, weights, device=CPU, **kwargs):
    """Outputs and d(sum of weighted outputs)/dg, computed on ``device`` and returned on the CPU;
    a None weight leaves that output out of the loss."""
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    g = g.detach().clone().to(device).requires_grad_()
    out = fn(g, move(t), move(valid), kwargs.pop("c1", C1), kwargs.pop("c2", C2), move(masks), **kwargs)
    loss = sum((o * w.to(o)).sum() for o, w in zip(out, weights) if w is not None and o is not None)
    loss.backward()
    return [None if o is None else o.cpu() for o in out], g.grad.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["multichunk", "one-chunk-clamped", "no-masks", "only-velocity-and-log-q"])
def test_triton_matches_reference(gen, case, dtype):
    from kernels._scheduler_triton import lomdm_schedule_triton

    n_rows, seq_len = 6, 37
    g, t, valid, masks = make_inputs(gen, n_rows, seq_len, 2)
    t[1] = 1.0  # every position of row 1 is masked, so log q stays finite at t = 1
    g = g.to(dtype)
    c1, c2, k_min, block = (0.35, 1.0, 0.05, None) if case == "one-chunk-clamped" else (C1, C2, 1e-4, 16)
    weights = [torch.randn(n_rows, seq_len, generator=gen) for _ in range(3)] + \
              [torch.randn(2, n_rows, generator=gen)]
    if case == "only-velocity-and-log-q":   # what training differentiates
        weights[0] = weights[1] = None
    if case == "no-masks":
        masks, weights[3] = None, None
    want, want_grad = _run(lomdm_schedule_reference, g.double(), t.double(), valid, masks,
                           [None if w is None else w.double() for w in weights], c1=c1, c2=c2, k_min=k_min)

    def kernel(gg, tt, vv, cc1, cc2, mm, k_min):
        m_u8 = vv.view(torch.uint8).unsqueeze(0)[:0] if mm is None else mm.view(torch.uint8)
        out = lomdm_schedule_triton(gg, tt.float(), vv.view(torch.uint8), m_u8, cc1, cc2, k_min, block=block)
        return out[:3] + ((None,) if mm is None else (out[3],))

    with poison_outputs():
        got, got_grad = _run(kernel, g, t.float(), valid, masks, weights, device=TRITON_DEVICE, c1=c1, c2=c2,
                             k_min=k_min)
    if case == "one-chunk-clamped":
        assert (want[0][valid] == k_min).any()  # the clamp is exercised
    assert (got[0][~valid] == c1).all()
    for name, a, b in zip(["k", "alpha", "velocity", "log_q"], got, want):
        if b is not None:
            assert a.dtype == torch.float32
            # fp32 against float64: NormSig sums 37 positions, then a few elementwise roundings: (37 + 8) * 2^-24
            assert rel_err(a, b) < 1e-5, name
    assert got_grad.dtype == dtype
    assert (got_grad[~valid] == 0).all()
    # fp32: as the values; bf16 (8 significant bits): one conversion of the gradient, 2^-8 relative rounded
    # to nearest, up to 2^-7 = 7.8e-3 truncated (Triton's CPU interpreter truncates)
    assert rel_err(got_grad, want_grad) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_public_api_triton_and_t_equal_one(gen):
    """backend='triton' through the public function; at t = 1 an unmasked position has log q = -inf
    (probability 0), with no NaN in values or gradient."""
    g, t, valid, masks = make_inputs(gen, 4, 20, 2)
    t[0] = 1.0
    masks[:, 0, 0] = False
    for backend, device in (("torch", CPU), ("triton", TRITON_DEVICE)):
        gg = g.float().to(device).requires_grad_()
        valid_d = valid.to(device)
        with poison_outputs():
            out = lomdm_schedule(gg, t.float().to(device), valid_d, C1, C2, masks.to(device), backend=backend)
            assert out.log_q[:, 0].eq(float("-inf")).all() and torch.isfinite(out.log_q[:, 1:]).all()
            (out.velocity.sum() + out.alpha.sum() + out.log_q[:, 1:].sum()).backward()
        assert torch.isfinite(gg.grad).all()
        assert torch.isfinite(out.alpha).all() and (out.alpha[0][valid_d[0]] == 0).all()
    assert lomdm_schedule(g.float(), t.float(), valid, C1, C2).log_q is None


def test_bad_inputs_name_the_problem(gen):
    g, t, valid, masks = make_inputs(gen, 3, 8, 2)
    g, t = g.float(), t.float()
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\], got t\[1\]"):
        lomdm_schedule(g, torch.tensor([0.5, 0.0, 0.2]), valid, C1, C2)
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        lomdm_schedule(g, t, valid.float(), C1, C2)
    with pytest.raises(ValueError, match=r"masks must be None or a bool tensor of shape \(K, 3, 8\)"):
        lomdm_schedule(g, t, valid, C1, C2, masks[:, :, :4])
    with pytest.raises(ValueError, match="k_min must be > 0"):
        lomdm_schedule(g, t, valid, C1, C2, k_min=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        lomdm_schedule(g, t, valid, C1, C2, backend="gpu")


# ------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): training shape
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_matches_reference(gen):
    g, t, valid, masks = make_inputs(gen, 32, 1024, 2)
    weights = [torch.randn(32, 1024, generator=gen) for _ in range(3)] + [torch.randn(2, 32, generator=gen)]
    want, want_grad = _run(lomdm_schedule_reference, g, t, valid, masks, [w.double() for w in weights])
    with poison_outputs():
        got, got_grad = _run(lomdm_schedule, g.float(), t.float(), valid, masks, weights, device=torch.device("cuda"))
    for name, a, b in zip(["k", "alpha", "velocity", "log_q"], got, want):
        assert rel_err(a, b) < 1e-5, name
    assert rel_err(got_grad, want_grad) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("t_value", [1e-3, 1 - 1e-6])
def test_gpu_accurate_at_extreme_times(t_value):
    """On the GPU exp/log may be fast approximations: the kernel's series must still hold 1e-5."""
    _check_extreme_times(t_value, (("torch", torch.device("cuda")), ("triton", torch.device("cuda"))))
