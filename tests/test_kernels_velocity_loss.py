"""Velocity-weighted loss: the reference against a naive float64 loop, the Triton kernel (interpreter
on CPU) against the reference in float64, and the vocab-parallel form against the full computation.

The oracle everywhere is float64 arithmetic on the very values the code under test sees (bf16
logits are rounded first), with gradients written out by hand: A (softmax - onehot) for the
logits, nll + log(A / A_hat) for A, 1 - A / A_hat for A_hat.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernels import dispatch
from kernels.dispatch import poison_outputs
from kernels.velocity_loss import (VocabPartials, combine_vocab_parallel, rescale_sumexp, velocity_loss,
                                   velocity_loss_reference, vocab_parallel_partials)

from helpers_kernels import rel_err

# Triton runs on CUDA where there is one, else on CPU under the interpreter (tests/conftest.py).
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# fp32 results from fp32 inputs, relative to the largest value: the longest reduction here is a
# log-sum-exp over v <= 120 logits, worst case (120 + a few) * 2^-24 = 7.5e-6
FP32_TOL = 1e-5
# results whose gradient is stored in bf16 (8 significant bits): one conversion is 2^-8 relative when it
# rounds to nearest and up to 2^-7 = 7.8e-3 when it truncates (Triton's CPU interpreter does); fp32 adds nothing
BF16_TOL = 1e-2




def make_inputs(gen: torch.Generator, n: int, v: int, *, mask_frac: float = 0.5, scale: float = 3.0,
                mask_token_id: int | None = None):
    logits = torch.randn(n, v, generator=gen, dtype=torch.float64) * scale
    targets = torch.randint(0, v, (n,), generator=gen)
    if mask_token_id is not None:  # targets are clean tokens: never the mask token
        targets = torch.where(targets == mask_token_id, (targets + 1) % v, targets)
    A = torch.rand(n, generator=gen, dtype=torch.float64) * 20 + 0.5
    A_hat = A * torch.exp(torch.randn(n, generator=gen, dtype=torch.float64) * 0.5)
    loss_mask = torch.rand(n, generator=gen) < mask_frac
    return logits, targets, A, A_hat, loss_mask


def naive_float64(logits, targets, A, A_hat, mask_token_id, loss_mask, w_main, w_vel):
    """Row-by-row loop: explicit softmax, the textbook velocity term and hand-written gradients."""
    x = logits.double().numpy()
    n, v = x.shape
    l_main, l_vel = np.zeros(n), np.zeros(n)
    g_x, g_a, g_ah = np.zeros((n, v)), np.zeros(n), np.zeros(n)
    for r in range(n):
        if not bool(loss_mask[r]):
            continue
        keep = [c for c in range(v) if c != mask_token_id]
        top = max(x[r, c] for c in keep)
        e = {c: math.exp(x[r, c] - top) for c in keep}
        total = sum(e.values())
        t = int(targets[r])
        a, ah = float(A[r]), float(A_hat[r])
        nll = -(x[r, t] - top - math.log(total))
        l_main[r] = a * nll
        l_vel[r] = a * (math.log(a) - math.log(ah)) - (a - ah)
        for c in keep:
            g_x[r, c] = float(w_main[r]) * a * (e[c] / total - (1.0 if c == t else 0.0))
        g_a[r] = float(w_main[r]) * nll + float(w_vel[r]) * (math.log(a) - math.log(ah))
        g_ah[r] = float(w_vel[r]) * (1.0 - a / ah)
    return [torch.from_numpy(a) for a in (l_main, l_vel, g_x, g_a, g_ah)]


def run_with_grads(fn, logits, targets, A, A_hat, w_main, w_vel, device=None, **kwargs):
    """Call fn on leaf copies (moved to ``device`` if given, with every tensor keyword) and backprop
    sum(w_main * l_main + w_vel * l_vel)."""
    if device is not None:
        logits, targets, A, A_hat, w_main, w_vel = (x.to(device) for x in (logits, targets, A, A_hat, w_main, w_vel))
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    logits, A, A_hat = (t.detach().clone().requires_grad_() for t in (logits, A, A_hat))
    l_main, l_vel = fn(logits, targets, A, A_hat, **kwargs)
    ((l_main * w_main.to(l_main.dtype)).sum() + (l_vel * w_vel.to(l_vel.dtype)).sum()).backward()
    return l_main, l_vel, logits.grad, A.grad, A_hat.grad


# ------------------------------------------------------------------------------------------------
# The reference against the naive loop
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_token_id", [None, 0, 12, 22])
def test_reference_matches_naive_float64(gen, mask_token_id):
    n, v = 9, 23
    logits, targets, A, A_hat, loss_mask = make_inputs(gen, n, v, mask_token_id=mask_token_id)
    w_main, w_vel = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen,
                                                                                    dtype=torch.float64)
    want = naive_float64(logits, targets, A, A_hat, mask_token_id, loss_mask, w_main, w_vel)
    got = run_with_grads(velocity_loss_reference, logits, targets, A, A_hat, w_main, w_vel,
                         mask_token_id=mask_token_id, loss_mask=loss_mask)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10  # the textbook velocity formula itself cancels a little
    # fp32 inputs: the reference computes in float32 and stays well inside 1e-3.
    got32 = run_with_grads(velocity_loss_reference, logits.float(), targets, A.float(), A_hat.float(), w_main, w_vel,
                           mask_token_id=mask_token_id, loss_mask=loss_mask)
    for g, w in zip(got32, want):
        assert g.dtype == torch.float32
        assert rel_err(g, w) < FP32_TOL


def test_velocity_term_accurate_when_A_hat_close_to_A(gen):
    """A_hat = A (1 + d) with d down to 1e-7: the textbook fp32 formula loses every digit here."""
    d = torch.tensor([1e-7, -3e-6, 1e-5, -2e-4, 3e-3, 0.05, -0.1, 0.2, 0.0], dtype=torch.float64)
    A = torch.rand(d.numel(), generator=gen, dtype=torch.float64) * 900 + 100  # A = k / t, t down to 1e-3
    A_hat = (A.float().double() * (1 + d)).float().double()   # exactly representable in fp32
    A = A.float().double()
    exact = A * ((A_hat - A) / A - torch.log1p((A_hat - A) / A))   # float64, d well away from eps
    n, v = d.numel(), 8
    logits = torch.randn(n, v, generator=gen)
    targets = torch.randint(0, v, (n,), generator=gen)
    for backend in ("torch", "triton"):
        _, l_vel = velocity_loss(*(x.to(TRITON_DEVICE) for x in (logits, targets, A.float(), A_hat.float())),
                                 mask_token_id=None, backend=backend)
        rel = ((l_vel.cpu().double() - exact).abs() / exact.abs().clamp(min=1e-300))[:-1]
        assert rel.max().item() < 1e-4, (backend, rel)
        assert l_vel[-1].item() == 0.0  # A_hat == A exactly
    textbook = A.float() * (torch.log(A.float()) - torch.log(A_hat.float())) - (A.float() - A_hat.float())
    assert ((textbook.double() - exact).abs() / exact.abs().clamp(min=1e-300))[:3].max() > 1e-2  # the test bites


# ------------------------------------------------------------------------------------------------
# The Triton kernel (interpreter on CPU) against the reference in float64
# ------------------------------------------------------------------------------------------------

CASES = {
    # name: (rows, vocab, block, fraction of rows in the loss, mask token)
    "partial-mask-multichunk": (37, 203, 64, 0.6, 202),
    "all-rows-mask-in-middle": (19, 150, 32, 1.0, 77),
    "no-rows": (11, 97, 32, 0.0, 96),
    "no-mask-token-one-chunk": (23, 130, None, 0.5, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(gen, case, dtype):
    from kernels._velocity_loss_triton import velocity_loss_triton

    n, v, block, frac, mask_token_id = CASES[case]
    logits, targets, A, A_hat, loss_mask = make_inputs(gen, n, v, mask_frac=frac, mask_token_id=mask_token_id)
    logits = logits.to(dtype)
    A, A_hat = A.float(), A_hat.float()
    w_main = torch.randn(n, generator=gen)
    w_vel = torch.randn(n, generator=gen)
    want = run_with_grads(velocity_loss_reference, logits.double(), targets, A.double(), A_hat.double(),
                          w_main.double(), w_vel.double(), mask_token_id=mask_token_id, loss_mask=loss_mask)

    def kernel(lg, tg, a, ah):
        return velocity_loss_triton(lg, tg, a, ah, loss_mask.to(lg.device).view(torch.uint8),
                                    -1 if mask_token_id is None else mask_token_id, block=block)

    with poison_outputs():
        got = run_with_grads(kernel, logits, targets, A, A_hat, w_main, w_vel, device=TRITON_DEVICE)
    got = [x.cpu() for x in got]
    l_main, l_vel, g_logits, g_a, g_ah = got
    assert l_main.dtype == l_vel.dtype == torch.float32 and g_logits.dtype == dtype
    assert (l_main[~loss_mask] == 0).all() and (l_vel[~loss_mask] == 0).all()
    assert (g_logits[~loss_mask] == 0).all() and (g_a[~loss_mask] == 0).all()
    if mask_token_id is not None:
        assert (g_logits[:, mask_token_id] == 0).all()
    tol_grad = FP32_TOL if dtype == torch.float32 else BF16_TOL
    for name, g, w, tol in zip(["l_main", "l_vel", "grad_logits", "grad_A", "grad_A_hat"], got, want,
                               [FP32_TOL, FP32_TOL, tol_grad, FP32_TOL, FP32_TOL]):
        assert rel_err(g, w) < tol, name


def test_public_api_forces_triton_and_matches(gen):
    n, v = 13, 71
    logits, targets, A, A_hat, loss_mask = make_inputs(gen, n, v, mask_token_id=70)
    logits = logits.float().requires_grad_()
    on_device = [x.to(TRITON_DEVICE) for x in (logits, targets, A.float(), A_hat.float(), loss_mask)]
    with poison_outputs():
        got = velocity_loss(*on_device[:4], mask_token_id=70, loss_mask=on_device[4], backend="triton")
    assert type(got[0].grad_fn).__name__.startswith("VelocityLossFunction")
    want = velocity_loss(logits, targets, A.float(), A_hat.float(), mask_token_id=70, loss_mask=loss_mask,
                         backend="auto")  # CPU tensors: auto is the reference
    assert "VelocityLoss" not in type(want[0].grad_fn).__name__
    auto = velocity_loss(*on_device[:4], mask_token_id=70, loss_mask=on_device[4], backend="auto")
    assert ("VelocityLoss" in type(auto[0].grad_fn).__name__) == (TRITON_DEVICE.type == "cuda")
    for g, w in zip(got, want):
        assert rel_err(g, w) < FP32_TOL


def test_large_logits_and_confident_rows(gen):
    """Logits near 90 overflow a naive exp; targets 6 and 10 above the rest have nll near 1e-3 and 1e-5,
    which fp32 resolves only through log1p(sum - 1) (the sum is 1 + nll)."""
    n, v = 6, 120
    logits = torch.randn(n, v, generator=gen, dtype=torch.float64) * 30
    targets = torch.randint(0, v - 1, (n,), generator=gen)
    gaps = torch.tensor([6.0, 10.0, 40.0], dtype=torch.float64)
    logits[torch.arange(3), targets[:3]] = logits[:3, : v - 1].amax(dim=1) + gaps
    logits = logits.float().double()
    A = torch.full((n,), 2.0, dtype=torch.float64)
    ones = torch.ones(n, dtype=torch.float64)
    want = run_with_grads(velocity_loss_reference, logits, targets, A, A, ones, ones, mask_token_id=v - 1)
    got = run_with_grads(velocity_loss, logits.float(), targets, A.float(), A.float(), ones.float(), ones.float(),
                         device=TRITON_DEVICE, mask_token_id=v - 1, backend="triton")
    got = [x.cpu() for x in got]
    assert rel_err(got[0][3:], want[0][3:]) < FP32_TOL
    row_rel = (got[0][:2].double() - want[0][:2]).abs() / want[0][:2]
    assert row_rel.max() < 1e-3, row_rel
    assert 0 <= got[0][2].item() < 1e-12  # nll ~ e^-40: below fp32 resolution of the sum, never negative
    assert rel_err(got[2], want[2]) < FP32_TOL


# ------------------------------------------------------------------------------------------------
# Vocab-parallel form
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bounds", [(0, 40, 91), (0, 57, 90, 91)], ids=["2-slices", "3-slices-last-is-mask"])
def test_vocab_parallel_equals_full(gen, backend, bounds):
    n, v, mask_token_id = 17, bounds[-1], bounds[-1] - 1
    logits, targets, A, A_hat, loss_mask = make_inputs(gen, n, v, mask_token_id=mask_token_id)
    targets[:4] = torch.tensor([0, 39, 40, 89])  # both sides of the first cut, and the last real token
    logits = logits.float()
    A, A_hat = A.float(), A_hat.float()
    w_main, w_vel = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    want = run_with_grads(velocity_loss_reference, logits.double(), targets, A.double(), A_hat.double(),
                          w_main.double(), w_vel.double(), mask_token_id=mask_token_id, loss_mask=loss_mask)

    def sliced(lg, tg, a, ah):
        parts = [vocab_parallel_partials(lg[:, lo:hi], tg, vocab_start=lo, mask_token_id=mask_token_id,
                                         loss_mask=loss_mask, backend=backend)
                 for lo, hi in zip(bounds[:-1], bounds[1:])]
        return combine_vocab_parallel(parts, a, ah, loss_mask=loss_mask)

    def all_reduced_by_hand(lg, tg, a, ah):
        """The documented protocol, with the three all-reduces written out as max / sum / sum."""
        parts = [vocab_parallel_partials(lg[:, lo:hi], tg, vocab_start=lo, mask_token_id=mask_token_id,
                                         loss_mask=loss_mask, backend=backend)
                 for lo, hi in zip(bounds[:-1], bounds[1:])]
        global_max = parts[0].local_max.clone()
        for p in parts[1:]:
            global_max = torch.maximum(global_max, p.local_max)
        sumexp = sum(rescale_sumexp(p.local_sumexp, p.local_max, global_max) for p in parts)
        target = sum(p.local_target_logit for p in parts)
        return combine_vocab_parallel(VocabPartials(global_max, sumexp, target), a, ah, loss_mask=loss_mask)

    device = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    loss_mask = loss_mask.to(device)
    for fn in (sliced, all_reduced_by_hand):
        with poison_outputs():
            got = run_with_grads(fn, logits, targets, A, A_hat, w_main, w_vel, device=device)
        for name, g, w in zip(["l_main", "l_vel", "grad_logits", "grad_A", "grad_A_hat"], got, want):
            assert rel_err(g, w) < FP32_TOL, (fn.__name__, name)


def test_vocab_partials_values(gen):
    """Each slice's statistics against a direct computation (the target outside the slice gives 0)."""
    n, v, lo, hi = 7, 50, 20, 35
    logits, targets, _, _, loss_mask = make_inputs(gen, n, v, mask_token_id=30)
    targets[:3] = torch.tensor([20, 34, 35])
    loss_mask[:3] = True
    with poison_outputs():
        got = vocab_parallel_partials(*(x.to(TRITON_DEVICE) for x in (logits[:, lo:hi].float(), targets)),
                                      vocab_start=lo, mask_token_id=30, loss_mask=loss_mask.to(TRITON_DEVICE),
                                      backend="triton")
    got = VocabPartials(*(x.cpu() for x in got))
    for r in range(n):
        if not loss_mask[r]:
            assert got.local_max[r] == 0 and got.local_sumexp[r] == 0 and got.local_target_logit[r] == 0
            continue
        cols = [c for c in range(lo, hi) if c != 30]
        row = logits[r, cols].float().double()
        assert abs(got.local_max[r].item() - row.max().item()) < 1e-6   # a max rounds nothing
        # a float32 sum of n <= 15 terms exp(x - max), each <= 1 and off by (1 + |x - max|) * 2^-24 (the
        # difference and the exponential round): worst case (n + 1 + max |x - max|) * 2^-24 of the sum
        want_sumexp = torch.exp(row - row.max()).sum().item()
        spread = (row.max() - row.min()).item()
        assert abs(got.local_sumexp[r].item() - want_sumexp) <= (len(cols) + 1 + spread) * 2**-24 * want_sumexp
        want_t = logits[r, targets[r]].float().item() if lo <= targets[r] < hi else 0.0
        assert got.local_target_logit[r].item() == want_t


# ------------------------------------------------------------------------------------------------
# Dispatch and input errors
# ------------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_problem(gen):
    logits, targets, A, A_hat, _ = make_inputs(gen, 5, 10, mask_token_id=9)
    logits, A, A_hat = logits.float(), A.float(), A_hat.float()
    call = lambda **kw: velocity_loss(**{"logits": logits, "targets": targets, "A": A, "A_hat": A_hat,  # noqa: E731
                                         "mask_token_id": 9, **kw})
    with pytest.raises(ValueError, match="targets outside"):
        call(targets=torch.tensor([0, 1, 2, 3, 10]))
    with pytest.raises(ValueError, match="mask_token_id=9"):
        call(targets=torch.tensor([0, 1, 9, 3, 4]))
    with pytest.raises(ValueError, match="A_hat not positive"):
        call(A_hat=torch.tensor([1.0, 1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"A must have shape \(5,\)"):
        call(A=A[:4])
    with pytest.raises(TypeError, match="loss_mask must be bool"):
        call(loss_mask=torch.ones(5))
    with pytest.raises(ValueError, match="backend must be one of"):
        call(backend="cuda")
    # rows outside the loss mask may carry anything, e.g. an ignore index
    out = call(targets=torch.tensor([0, 1, -100, 3, 4]), loss_mask=torch.tensor([True, True, False, True, True]))
    assert out[0][2] == 0


def test_forced_triton_without_interpreter_says_how(monkeypatch, gen):
    logits, targets, A, A_hat, _ = make_inputs(gen, 3, 8)  # CPU tensors
    monkeypatch.setattr(dispatch, "triton_is_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        velocity_loss(logits.float(), targets, A.float(), A_hat.float(), mask_token_id=None, backend="triton")


# ------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): training-sized vocabulary
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_matches_reference(gen, dtype):
    n, v, mask_token_id = 1024, 50258, 50257
    logits, targets, A, A_hat, loss_mask = make_inputs(gen, n, v, mask_token_id=mask_token_id)
    w_main, w_vel = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    cuda = lambda x: x.cuda()  # noqa: E731
    logits, targets, A, A_hat, loss_mask, w_main, w_vel = map(cuda, (logits.to(dtype), targets, A.float(),
                                                                     A_hat.float(), loss_mask, w_main, w_vel))
    want = run_with_grads(velocity_loss_reference, logits.double(), targets, A.double(), A_hat.double(),
                          w_main.double(), w_vel.double(), mask_token_id=mask_token_id, loss_mask=loss_mask)
    with poison_outputs():
        got = run_with_grads(velocity_loss, logits, targets, A, A_hat, w_main, w_vel, mask_token_id=mask_token_id,
                             loss_mask=loss_mask, backend="auto")
    # v = 50258: the log-sum-exp's sum rounds sqrt(v) * 2^-24 = 1.3e-5 typically, within FP32_TOL * 10
    tol_grad = FP32_TOL * 10 if dtype == torch.float32 else BF16_TOL
    for name, g, w, tol in zip(["l_main", "l_vel", "grad_logits", "grad_A", "grad_A_hat"], got, want,
                               [FP32_TOL * 10, FP32_TOL * 10, tol_grad, FP32_TOL * 10, FP32_TOL * 10]):
        assert rel_err(g, w) < tol, name
    bounds = (0, 25129, v)
    lg = logits.detach().requires_grad_()
    parts = [vocab_parallel_partials(lg[:, lo:hi], targets, vocab_start=lo, mask_token_id=mask_token_id,
                                     loss_mask=loss_mask) for lo, hi in zip(bounds[:-1], bounds[1:])]
    l_main, l_vel = combine_vocab_parallel(parts, A, A_hat, loss_mask=loss_mask)
    (l_main * w_main).sum().backward()
    assert rel_err(l_main, want[0]) < FP32_TOL * 10
    assert rel_err(lg.grad, got[2]) < tol_grad
