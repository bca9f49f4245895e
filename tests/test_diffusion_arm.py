"""The eps-regularised autoregressive scheduler: its NELBO is the autoregressive NLL + O(eps).

The NELBO side is computed exactly, not by Monte Carlo: for a row of L <= 5 tokens every mask
pattern z is enumerated and -log x_theta(z)_i[x_i] computed once per z; the Bernoulli weights
q(z | t) times the velocities are integrated over t with Gauss-Legendre on each scheduler window,
where the integrand is a polynomial of degree L - 1 (the 1 / (1 - alpha_i) of A_i cancels the
factor (1 - alpha_i) of q), so the quadrature is exact. The autoregressive side predicts position
i from the input with positions < i clean and >= i masked, with the same denoiser.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers_diffusion import (all_masks, batch_mean_and_se, one_torch_thread, piecewise_nodes, token_nll, toy_model,
                               window_masked_prob, window_masked_rate)
from lomdm_dist.config import DiffusionConfig
from lomdm_dist.diffusion.objective import StepSpec, diffusion_loss
from lomdm_dist.diffusion.schedulers import build_scheduler

V = 5
SEQ_LEN = 5
Z_LIMIT = 4.0


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def setup():
    model = toy_model(V + 1, SEQ_LEN, seed=21)
    x = torch.tensor([[3, 0, 4, 1, 2]])
    masks = all_masks(SEQ_LEN)
    z = torch.where(masks, torch.full_like(x, model.mask_token_id), x)
    with torch.no_grad():
        nll = token_nll(model, z, x.expand_as(z)).numpy()            # (2^L, L), 0 where clean
        prefixes = torch.tensor([[j >= i for j in range(SEQ_LEN)] for i in range(SEQ_LEN)])
        y = torch.where(prefixes, torch.full_like(x, model.mask_token_id), x)
        ar_nll = float(token_nll(model, y, x.expand_as(y)).diagonal().sum())
    return model, x, masks.numpy(), nll, ar_nll


def exact_nelbo(masks: np.ndarray, nll: np.ndarray, eps: float, lo: float = 0.0, hi: float = 1.0) -> float:
    """Integral over t in [lo, hi] of sum_z q(z | t) sum_i z_i A_i(t) nll_i(z), exact quadrature."""
    windows = [m / SEQ_LEN for m in range(SEQ_LEN + 1)]
    t, w = piecewise_nodes(windows, lo, hi, n=8)
    p = window_masked_prob(t, SEQ_LEN, 1, eps)                       # (T, L) = 1 - alpha
    A = window_masked_rate(t, SEQ_LEN, 1, eps) / p                   # -alpha' / (1 - alpha)
    q = np.where(masks[None], p[:, None], 1.0 - p[:, None]).prod(-1)  # (T, 2^L)
    integrand = (q * (masks[None] * A[:, None] * nll[None]).sum(-1)).sum(-1)
    return float(integrand @ w)


def test_denoiser_is_informative(setup):
    _, _, masks, nll, _ = setup
    masked_values = nll[masks]
    assert masked_values.min() < 1.0 < 2.5 < masked_values.max()  # far from uniform (log 5 = 1.61)


def test_arm_nelbo_converges_to_the_autoregressive_nll(setup):
    """|NELBO_eps - AR NLL| <= 2 L^2 max(nll) eps, and the gap shrinks linearly with eps.

    Bound: in the window of position i the other positions are in their autoregressive state
    except with probability <= (L - 1) eps, the velocity mass of position i is (1 - eps) + eps / L
    instead of 1, and every other position carries velocity mass eps / L; summing over L windows
    gives at most 2 L^2 eps max(nll).
    """
    _, _, masks, nll, ar_nll = setup
    gaps = []
    for eps in (1e-1, 1e-2, 1e-3):
        gap = abs(exact_nelbo(masks, nll, eps) - ar_nll)
        assert gap <= 2 * SEQ_LEN ** 2 * nll.max() * eps
        gaps.append(gap)
    assert gaps[1] < gaps[0] / 5 and gaps[2] < gaps[1] / 5
    # Quadrature sanity: with a constant nll of 1 the NELBO is the total velocity mass, L.
    # float64 sums of 40 nodes x 32 masks x 5 positions: 6400 * 2^-53 = 7e-13 at most
    assert exact_nelbo(masks, np.ones_like(nll), 1e-2) == pytest.approx(SEQ_LEN, rel=1e-12)


@pytest.mark.parametrize("eps", [1e-2, 1e-3])
def test_diffusion_loss_estimates_the_exact_nelbo(setup, eps):
    """The Monte-Carlo estimator's mean equals the exact NELBO restricted to its time range.

    t = t_eps + (1 - t_eps) u with u ~ U[0, 1), so E[estimate] = integral over [t_eps, 1] / (1 - t_eps).
    """
    model, x, masks, nll, _ = setup
    cfg = DiffusionConfig(scheduler="arm", window_eps=eps, t_eps=1e-3)
    expected = exact_nelbo(masks, nll, eps, cfg.t_eps, 1.0) / (1.0 - cfg.t_eps)
    batch = 256
    rows = torch.arange(batch)
    xb = x.expand(batch, -1).contiguous()
    per_step = []
    with torch.no_grad():
        for step in range(150):
            out = diffusion_loss(model, build_scheduler(cfg), xb,
                                 StepSpec(seed=5, step=step, rows=rows, global_batch=batch), cfg=cfg)
            per_step.append(out.row_nelbo.mean().item())
    mean, se = batch_mean_and_se(per_step)
    assert abs(mean - expected) <= Z_LIMIT * se, (mean, expected, se)
    assert se < 0.02 * expected
