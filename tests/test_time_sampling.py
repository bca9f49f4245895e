"""The NELBO estimator covers the whole time interval (0, 1]: checked against a closed form.

For a row of L = 5 tokens every mask pattern can be enumerated, and the full-interval bound has a
closed form. With exponents k (from phi on the clean row), masked set M and clean set U of a
pattern, q(z | t) = t^(K_M) prod_{j in U} (1 - t^k_j) with K_M = sum_{i in M} k_i, and every term of
the integrand carries 1/t (A = k / t, A_hat = k_hat / t), so by inclusion-exclusion over U

    NELBO(x) = sum_{M != {}} G(M) * sum_{S subset U} (-1)^|S| / (K_M + K_S),
    G(M)     = sum_{i in M} [ k_i l_i(z) + k_i log(k_i / k_hat_i(z)) - k_i + k_hat_i(z) ]

with l_i(z) = -log x_theta(z)_i[x_i] and k_hat(z) from psi on z (a denoiser without time input does
not depend on t). The truncated bound of MDLM's estimator replaces 1/c by (1 - t_eps^c) / c and
divides by 1 - t_eps (t uniform on [t_eps, 1], weight 1).

Everything on the reference side is written out here (NormSig, the exponents, the integral) and
only the network outputs are shared with the code under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from helpers_diffusion import all_masks, one_torch_thread, randomise_zero_init, token_nll
from lomdm_dist.config import DiffusionConfig, ModelConfig
from lomdm_dist.diffusion import time_sampling
from lomdm_dist.diffusion.objective import PlainPasses, StepSpec, diffusion_loss
from lomdm_dist.diffusion.schedulers import build_scheduler
from lomdm_dist.model import build_model

V = 4               # real tokens; mask id V
SEQ_LEN = 5
DISTINCT = 4        # distinct rows, each repeated in the batch
BATCH = 64
T_EPS = 0.01        # truncation of the truncated option in these tests: its bias is then about 6%
C1, C2 = 0.7, 0.65
STEPS = 240         # batches of 64 rows per estimate: a standard error of about 1.1% of the bound


def config(time_sampling: str, t_eps: float = T_EPS) -> DiffusionConfig:
    """Independent times per row: with antithetic times the copies of a distinct row (rows d, d + 4,
    ...) would always land in the same comb of strata, which is unbiased only for the whole batch of
    exchangeable rows, not for each distinct row."""
    return DiffusionConfig(scheduler="lomdm", c1=C1, c2=C2, t_eps=t_eps, time_sampling=time_sampling,
                           antithetic=False)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    yield from one_torch_thread()


def hand_exponents(g: torch.Tensor, c1: float = C1, c2: float = C2) -> torch.Tensor:
    """Centred NormSig by hand: s = sigmoid(g - mean g); k = c1 + c2 (s - mean s) (no padding)."""
    g = g.double()
    s = torch.sigmoid(g - g.mean(-1, keepdim=True))
    return c1 + c2 * (s - s.mean(-1, keepdim=True))


def build(randomise_denoiser: bool, spread: float = 20.0):
    """Tiny model whose phi gives exponents from about 0.39 to 1.1: nearly saturated sigmoids. In a
    row of 5, NormSig's mean keeps them inside (c1 - 0.8 c2, c1 + 0.8 c2) = (0.18, 1.22) of the
    range (c1 - c2, c1 + c2) = (0.05, 1.35) that long rows can reach."""
    torch.manual_seed(1)
    mcfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, cond_dim=8, dropout=0.0, head_mlp_hidden=8)
    model = build_model(mcfg, config("importance"), V + 1)
    if randomise_denoiser:
        randomise_zero_init(model, seed=1)
    else:       # uniform denoiser (zero output layer), random heads
        for head in (model.phi, model.psi):
            randomise_zero_init(head, seed=2)
    xs = torch.randint(0, V, (DISTINCT, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    backbone = model.backbone
    with torch.no_grad():
        c = backbone.conditioning(DISTINCT)
        g0 = model.phi(backbone.features(xs, c), c)
        centred = g0 - g0.mean(-1, keepdim=True)
        model.phi.out.weight.mul_(spread / centred.abs().max())     # centred g within [-spread, spread]
    return model, xs


def phi_exponents(model, xs: torch.Tensor) -> torch.Tensor:
    c = model.backbone.conditioning(xs.shape[0])
    with torch.no_grad():
        return hand_exponents(model.phi(model.backbone.features(xs, c), c))


def pattern_terms(model, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """l (B, M, L) and k_hat (B, M, L) for every mask pattern of every row."""
    masks = all_masks(SEQ_LEN)
    z = torch.where(masks[None], torch.full((DISTINCT, len(masks), SEQ_LEN), model.mask_token_id),
                    xs[:, None, :]).reshape(-1, SEQ_LEN)
    with torch.no_grad():
        nll = token_nll(model, z, xs.repeat_interleave(len(masks), 0))
        cz = model.backbone.conditioning(z.shape[0])
        k_hat = hand_exponents(model.psi(model.backbone.features(z, cz), cz))
    return nll.reshape(DISTINCT, len(masks), SEQ_LEN), k_hat.reshape(DISTINCT, len(masks), SEQ_LEN)


def exact_nelbo(k: torch.Tensor, nll: torch.Tensor, k_hat: torch.Tensor, t_eps: float = 0.0,
                velocity: bool = True) -> torch.Tensor:
    """(B,) bound per row over (t_eps, 1] (t_eps = 0: the whole interval), normalised as the
    truncated estimator's expectation (divided by 1 - t_eps) when t_eps > 0."""
    masks = all_masks(SEQ_LEN)
    out = torch.zeros(k.shape[0], dtype=torch.float64)
    for m_index, pattern in enumerate(masks.tolist()):
        M = [i for i in range(SEQ_LEN) if pattern[i]]
        if not M:
            continue
        U = [j for j in range(SEQ_LEN) if not pattern[j]]
        kM = k[:, M].sum(-1)
        integral = torch.zeros_like(kM)
        for size in range(len(U) + 1):
            for S in itertools.combinations(U, size):
                c = kM + (k[:, list(S)].sum(-1) if S else 0.0)
                integral = integral + (-1) ** size * (1.0 - t_eps ** c) / c
        kk, kh, l = k[:, M], k_hat[:, m_index, M], nll[:, m_index, M]
        G = kk * l
        if velocity:
            G = G + kk * torch.log(kk / kh) - kk + kh
        out = out + G.sum(-1) * integral
    return out / (1.0 - t_eps)


def estimates(model, xs, cfg: DiffusionConfig, steps: int, **kwargs) -> torch.Tensor:
    """(steps, DISTINCT): per step, the mean row NELBO estimate of each distinct row."""
    scheduler = build_scheduler(cfg)
    x = xs.repeat(BATCH // DISTINCT, 1)
    rows = torch.arange(BATCH)
    per_step = []
    with torch.no_grad():
        for step in range(steps):
            out = diffusion_loss(model, scheduler, x,
                                 StepSpec(seed=5, step=step, rows=rows, global_batch=BATCH, num_masks=2), cfg=cfg,
                                 **kwargs)
            per_step.append(out.row_nelbo.reshape(-1, DISTINCT).mean(0))
    return torch.stack(per_step)


def z_score(per_step: torch.Tensor, exact: torch.Tensor) -> float:
    """z of the summed rows' estimate against the exact sum (steps are independent)."""
    total = per_step.sum(1)
    se = total.std() / math.sqrt(total.numel())
    return float((total.mean() - exact.sum()) / se)


@pytest.fixture(scope="module")
def trained_like():
    model, xs = build(randomise_denoiser=True)
    k = phi_exponents(model, xs)
    nll, k_hat = pattern_terms(model, xs)
    return model, xs, k, nll, k_hat


def test_exponents_spread_over_the_allowed_range(trained_like):
    _, _, k, _, _ = trained_like
    assert float(k.detach().min()) < 0.4 and float(k.detach().max()) > 1.05


def test_importance_sampled_nelbo_is_the_full_interval_bound(trained_like):
    model, xs, k, nll, k_hat = trained_like
    full = exact_nelbo(k, nll, k_hat)
    truncated = exact_nelbo(k, nll, k_hat, t_eps=T_EPS)
    # The truncation is visible at this scale: the check below could not pass by accident.
    assert float((full.sum() - truncated.sum()) / full.sum()) > 0.04
    per_step = estimates(model, xs, config("importance"), steps=STEPS)
    assert abs(z_score(per_step, full)) < 3.0, z_score(per_step, full)
    se = per_step.sum(1).std() / math.sqrt(per_step.shape[0])
    assert float(se) < 0.015 * float(full.sum())          # the check resolves 1.5% of the bound


def test_truncated_option_matches_the_truncated_bound_and_not_the_full_one(trained_like):
    model, xs, k, nll, k_hat = trained_like
    per_step = estimates(model, xs, config("truncated"), steps=STEPS)
    assert abs(z_score(per_step, exact_nelbo(k, nll, k_hat, t_eps=T_EPS))) < 3.0
    # The truncated bound is about 6% below the full one, about 5 standard errors at this size.
    assert z_score(per_step, exact_nelbo(k, nll, k_hat)) < -4.0


def main_only(logits, targets, A, A_hat, *, mask_token_id):
    """The token loss with the velocity term removed: the L_main part of the estimator alone."""
    from kernels.velocity_loss import velocity_loss

    l_main, l_vel = velocity_loss(logits, targets, A, A_hat, mask_token_id=mask_token_id)
    return l_main, torch.zeros_like(l_vel)


def phi_gradients(model, xs, cfg: DiffusionConfig, steps: int) -> torch.Tensor:
    """(steps, P): gradient of the L_main surrogate (RLOO included) w.r.t. phi's parameters."""
    scheduler = build_scheduler(cfg)
    params = list(model.phi.parameters())
    x = xs.repeat(BATCH // DISTINCT, 1)
    rows = torch.arange(BATCH)
    grads = []
    for step in range(steps):
        out = diffusion_loss(model, scheduler, x, StepSpec(seed=6, step=step, rows=rows, global_batch=BATCH, num_masks=2),
                             cfg=cfg, passes=PlainPasses(model, token_loss=main_only))
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(out.loss, params)]).double())
    return torch.stack(grads)


def test_uniform_denoiser_gives_phi_no_gradient_over_the_whole_interval():
    """With a uniform denoiser E[L_main] = L log V whatever the exponents: its true gradient w.r.t.
    phi is zero. The importance-sampled estimate is zero within noise; the truncated one follows the
    gradient of the truncated bound, log V sum_i (1 - t_eps^k_i) / (1 - t_eps), which pays phi to
    spread the exponents. The truncated side uses t_eps = 0.05 so that its gradient stands out of
    the RLOO noise in a few dozen steps."""
    t_eps = 0.05
    model, xs = build(randomise_denoiser=False, spread=2.0)     # sigmoids in their linear range
    full = phi_gradients(model, xs, config("importance"), steps=120)
    n = full.shape[0]
    mean, se = full.mean(0), full.std(0) / math.sqrt(n)
    T = float((mean ** 2).sum() / (se ** 2).sum())       # about 1 for a zero-mean estimate
    assert T < 9.0, T

    params = list(model.phi.parameters())
    c = model.backbone.conditioning(DISTINCT)
    with torch.no_grad():
        h = model.backbone.features(xs, c)
    k = hand_exponents(model.phi(h, c))
    rows_per_distinct = BATCH // DISTINCT
    bound = math.log(V) * (1.0 - t_eps ** k).sum() * rows_per_distinct / (1.0 - t_eps) / (BATCH * SEQ_LEN)
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(bound, params)]).double()
    truncated = phi_gradients(model, xs, config("truncated", t_eps), steps=120)
    diff = truncated - exact
    T_trunc = float((diff.mean(0) ** 2).sum() / ((diff.std(0) / math.sqrt(n)) ** 2).sum())
    assert T_trunc < 9.0, T_trunc
    # ... and that gradient is far from zero: the full-interval check above could fail.
    T_zero = float((truncated.mean(0) ** 2).sum() / ((truncated.std(0) / math.sqrt(n)) ** 2).sum())
    assert T_zero > 25.0, T_zero


@pytest.mark.parametrize("sampler", [time_sampling.PowerUniformMixture(0.025, 0.2),
                                     time_sampling.PowerUniformMixture(0.35, 1.0)])
def test_inverse_cdf_draws_follow_the_density(sampler):
    """Times at stratified uniforms are quantiles of p: F(t) = lam t^b + (1 - lam) t equals u, and
    E_p[w(t) k t^(k-1)] = 1 for any k > b (checked at the quantiles by midpoint quadrature)."""
    u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    draw = sampler.draw(u)
    b, lam = sampler.power, sampler.share
    F = lam * torch.exp(b * draw.log_t) + (1 - lam) * torch.exp(draw.log_t)
    torch.testing.assert_close(F, 1.0 - u, rtol=1e-12, atol=1e-14)   # float64 bisection to full precision
    for k in (max(0.1, 2 * b), 0.7, 1.3):          # k > b: a bounded integrand
        value = (draw.row_weight * k * torch.exp(k * draw.log_t)).mean()
        # Midpoint rule over 20,000 quantiles of a smooth, integrable function: error well below 1%.
        assert abs(float(value) - 1.0) < 0.01, (k, float(value))


def test_time_sampling_defaults_and_checks():
    from lomdm_dist.config import ConfigError, load_config

    assert time_sampling.resolved_time_sampling(DiffusionConfig(scheduler="lomdm")) == "importance"
    assert time_sampling.resolved_time_sampling(DiffusionConfig(scheduler="mdlm")) == "truncated"
    assert time_sampling.resolved_power(DiffusionConfig(scheduler="lomdm", c1=0.7, c2=0.65)) == pytest.approx(0.025)
    with pytest.raises(ConfigError, match="diffusion.is_power"):
        load_config("configs/smoke.yaml", ["diffusion.is_power=0.06"])      # not below c1 - c2 = 0.05
    cfg = load_config("configs/smoke.yaml", ["diffusion.scheduler=mdlm", "diffusion.time_sampling=importance"])
    assert isinstance(time_sampling.build_time_sampler(cfg.diffusion), time_sampling.PowerUniformMixture)
