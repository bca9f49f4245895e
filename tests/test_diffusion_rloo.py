"""The RLOO gradient for the forward-scheduler head phi is unbiased, checked by enumeration.

The masks of the learned scheduler are drawn from q_phi(z | x, t), so the gradient of the expected
NELBO has a score-function part besides the pathwise one (the A_phi factors). For rows of L = 5
tokens every mask can be enumerated: for the t values that the estimator drew at each step,

    E_z[F] = sum_z q_phi(z | x, t) F(z),   q_phi = prod_i Bernoulli(t^k_i),   k = c1 + c2 NormSig(g_phi)

is written out here (NormSig, log q and F by hand, not through the kernels), and autograd gives its
exact gradient. The mean of many RLOO estimates must match it to within the estimator's
mask-sampling standard error; the estimator without the RLOO term (one mask, pathwise part only)
must not.

Statistic: d_s = (estimate at step s) - (exact gradient at the same t values), one vector per step;
the steps are independent. With m = mean_s d_s and se_j the standard error of coordinate j,
T = |m|^2 / sum_j se_j^2 has expectation about 1 for an unbiased estimator. Tolerance: T <= 9
(|m| within 3 root-sum-square standard errors) and the projection of m on the exact gradient
within 4 of its standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers_diffusion import all_masks, one_torch_thread, randomise_zero_init, token_nll
from kernels.scheduler import lomdm_schedule
from lomdm_dist.config import DiffusionConfig, ModelConfig
from lomdm_dist.diffusion import randomness
from lomdm_dist.diffusion.objective import StepSpec, diffusion_loss
from lomdm_dist.diffusion.schedulers import build_scheduler
from lomdm_dist.model import build_model

V = 4             # real tokens; mask id V
SEQ_LEN = 5
DISTINCT = 4      # distinct rows, each repeated in the batch
BATCH = 64
# The truncated time sampling with t_eps = 0.05 rather than 1e-3: the score-function variance grows
# like log(t)^2 near t = 0, and the property under test (unbiased at the drawn t) does not depend on
# how t is drawn; tests/test_time_sampling.py covers the whole interval.
CFG = DiffusionConfig(scheduler="lomdm", c1=0.7, c2=0.65, t_eps=0.05, time_sampling="truncated")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    mcfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, cond_dim=8, dropout=0.0, head_mlp_hidden=8)
    model = build_model(mcfg, CFG, V + 1)
    randomise_zero_init(model, seed=1)
    xs = torch.randint(0, V, (DISTINCT, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    backbone = model.backbone
    with torch.no_grad():
        # Rescale phi's read-out so that g has spread 2 on these rows: exponents then span roughly
        # (0.3, 1.0) instead of sitting at c1.
        c = backbone.conditioning(DISTINCT)
        g0 = model.phi(backbone.features(xs, c), c)
        model.phi.out.weight.mul_(2.0 / g0.std())
        # Everything that does not depend on phi, for every mask pattern of every distinct row.
        masks = all_masks(SEQ_LEN)
        z = torch.where(masks[None], torch.full((DISTINCT, len(masks), SEQ_LEN), model.mask_token_id),
                        xs[:, None, :]).reshape(-1, SEQ_LEN)
        nll = token_nll(model, z, xs.repeat_interleave(len(masks), 0)).reshape(DISTINCT, len(masks), SEQ_LEN)
        cz = backbone.conditioning(z.shape[0])
        g_psi = model.psi(backbone.features(z, cz), cz).double()
        k_hat = normsig_exponents(g_psi).reshape(DISTINCT, len(masks), SEQ_LEN)
    return model, xs, masks, nll, k_hat


def normsig_exponents(g: torch.Tensor) -> torch.Tensor:
    """k = max(c1 + c2 (sigmoid(v_i) - mean_j sigmoid(v_j)), k_min) per row with v = g - mean(g)
    (the centred NormSig; no padding here)."""
    g = g.double()
    s = torch.sigmoid(g - g.mean(-1, keepdim=True))
    return (CFG.c1 + CFG.c2 * (s - s.mean(-1, keepdim=True))).clamp(min=CFG.k_min)


def phi_exponents(model, xs: torch.Tensor) -> torch.Tensor:
    backbone = model.backbone
    c = backbone.conditioning(xs.shape[0])
    with torch.no_grad():
        h = backbone.features(xs, c)
    return normsig_exponents(model.phi(h, c))


def flat_grad(value: torch.Tensor, params: list[torch.Tensor], **kwargs) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, params, **kwargs)]).double()


def exact_expected_loss(k: torch.Tensor, t: torch.Tensor, masks: torch.Tensor, nll: torch.Tensor,
                        k_hat: torch.Tensor) -> torch.Tensor:
    """sum over rows of E_{z ~ q_phi(. | x, t)} F(z) / (rows * L), with F = L_main + L_velocity.

    k (B, L) per row, t (B,), masks (M, L) all patterns, nll / k_hat (B, M, L) per row and pattern.
    """
    m = masks.double()[None]                                          # (1, M, L)
    log_t = torch.log(t)[:, None, None]
    kk = k[:, None, :]
    log_q = (m * kk * log_t + (1 - m) * torch.log(-torch.expm1(kk * log_t))).sum(-1)   # (B, M)
    A = kk / t[:, None, None]
    A_hat = k_hat / t[:, None, None]
    F = (m * (A * nll + A * (torch.log(A) - torch.log(A_hat)) - (A - A_hat))).sum(-1)  # (B, M)
    return (log_q.exp() * F).sum() / (k.shape[0] * k.shape[1])


def estimator_vs_exact(problem, steps: int, num_masks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-step differences (estimate - exact), shape (steps, P), and the exact mean gradient."""
    model, xs, masks, nll, k_hat = problem
    params = list(model.phi.parameters())
    scheduler = build_scheduler(CFG)
    repeat = BATCH // DISTINCT
    x = xs.repeat(repeat, 1)
    rows = torch.arange(BATCH)
    row_kind = rows % DISTINCT
    k = phi_exponents(model, xs)
    diffs, exact = [], []
    for step in range(steps):
        out = diffusion_loss(model, scheduler, x,
                             StepSpec(seed=4, step=step, rows=rows, global_batch=BATCH, num_masks=num_masks), cfg=CFG)
        estimate = flat_grad(out.loss, params)
        # The objective computes A and log q from float32 t; use the same values.
        t = randomness.diffusion_times(4, step, rows, BATCH, t_eps=CFG.t_eps).float().double()
        expected = exact_expected_loss(k[row_kind], t, masks, nll[row_kind], k_hat[row_kind])
        exact_step = flat_grad(expected, params, retain_graph=True)
        diffs.append(estimate - exact_step)
        exact.append(exact_step)
    return torch.stack(diffs), torch.stack(exact).mean(0)


def bias_statistics(diffs: torch.Tensor, exact: torch.Tensor) -> tuple[float, float, float]:
    """(T, z of the projection on the exact gradient, root-sum-square standard error)."""
    n = diffs.shape[0]
    mean, se = diffs.mean(0), diffs.std(0) / math.sqrt(n)
    T = float((mean ** 2).sum() / (se ** 2).sum())
    direction = exact / exact.norm()
    projection = diffs @ direction
    z = float(projection.mean() / (projection.std() / math.sqrt(n)))
    return T, z, float((se ** 2).sum().sqrt())


def test_exponents_vary_and_match_the_kernel(problem):
    model, xs, _, _, _ = problem
    k = phi_exponents(model, xs)
    assert float(k.detach().min()) < 0.45 and float(k.detach().max()) > 0.9
    c = model.backbone.conditioning(DISTINCT)
    g = model.phi(model.backbone.features(xs, c), c)
    kernel = lomdm_schedule(g - g.mean(-1, keepdim=True), torch.full((DISTINCT,), 0.5),
                            torch.ones_like(xs, dtype=torch.bool), CFG.c1, CFG.c2, k_min=CFG.k_min).k
    # the fp32 kernel against float64 on the same g: a sigmoid, a mean over 5 positions, a scale and a shift,
    # (5 + 4) * 2^-24 = 5.4e-7 of k ~ 1 at most
    torch.testing.assert_close(kernel.double(), k, rtol=1e-6, atol=1e-7)


def test_rloo_gradient_is_unbiased_and_pathwise_alone_is_not(problem):
    diffs, exact = estimator_vs_exact(problem, steps=200, num_masks=2)
    T, z, rss_se = bias_statistics(diffs, exact)
    assert T <= 9.0 and abs(z) <= 4.0, (T, z)
    assert rss_se < 0.15 * float(exact.norm())  # the check resolves 15% of the gradient's norm

    # Without the RLOO term (one mask: the pathwise part only) the same check fails by far.
    diffs_biased, exact_biased = estimator_vs_exact(problem, steps=50, num_masks=1)
    T_biased, z_biased, _ = bias_statistics(diffs_biased, exact_biased)
    assert T_biased > 25.0 and abs(z_biased) > 6.0, (T_biased, z_biased)
