"""The NELBO objective against quantities derived by hand or computed another way.

* With A_hat = A and a denoiser that is uniform over the V real tokens, every masked position costs
  A_i log V, so the expected NELBO has a closed form (log V per token in the untruncated limit).
* With the MDLM scheduler the OeMDM loss must be MDLM's loss, written here in MDLM's own terms.
* The velocity-matching term is a Bregman divergence: non-negative, zero with zero gradient at
  A_hat = A; with c2 = 0 no gradient can reach the reverse-scheduler head.
* A row's NELBO does not depend on how the batch is split.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers_diffusion import (batch_mean_and_se, one_torch_thread, piecewise_nodes, randomise_zero_init,
                               token_nll, toy_model, window_masked_prob)
from kernels.velocity_loss import velocity_loss
from lomdm_dist.config import DiffusionConfig, ModelConfig
from lomdm_dist.diffusion import randomness
from lomdm_dist.diffusion.objective import PlainPasses, StepSpec, diffusion_loss
from lomdm_dist.diffusion.schedulers import build_scheduler
from lomdm_dist.model import build_model

V = 6                 # real tokens; the mask token is id V
SEQ_LEN = 8
Z_LIMIT = 4.0         # Monte-Carlo checks: |estimate - exact| within 4 standard errors

FIXED = {
    "mdlm": DiffusionConfig(scheduler="mdlm"),
    "mdlm_eps0.2": DiffusionConfig(scheduler="mdlm", mdlm_eps=0.2),   # expectation 0.8 log V
    "poly_0.7": DiffusionConfig(scheduler="poly", c1=0.7),
    "poly_0.7_teps0.3": DiffusionConfig(scheduler="poly", c1=0.7, t_eps=0.3),  # 0.81 log V
    "poly_1.5": DiffusionConfig(scheduler="poly", c1=1.5),
    "arm": DiffusionConfig(scheduler="arm"),
    "block": DiffusionConfig(scheduler="block", block_size=4),
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    yield from one_torch_thread()


def masked_prob_closed_form(cfg: DiffusionConfig, t: np.ndarray) -> np.ndarray:
    """1 - alpha_i(t), (..., L), written from the scheduler definitions (not from the library)."""
    t = np.asarray(t, dtype=np.float64)
    if cfg.scheduler == "mdlm":
        return np.repeat(((1.0 - cfg.mdlm_eps) * t)[..., None], SEQ_LEN, axis=-1)
    if cfg.scheduler == "poly":
        return np.repeat((t ** cfg.c1)[..., None], SEQ_LEN, axis=-1)
    block = 1 if cfg.scheduler == "arm" else cfg.block_size
    return window_masked_prob(t, SEQ_LEN, block, cfg.window_eps)


def real_model(scheduler: str, *, seed: int = 0, time_conditioning: bool = False):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, cond_dim=8, dropout=0.0, head_mlp_hidden=8,
                      time_conditioning=time_conditioning)
    model = build_model(cfg, DiffusionConfig(scheduler=scheduler), V + 1)
    randomise_zero_init(model, seed=seed + 1)
    return model


def random_tokens(batch: int, seed: int = 0, length: int = SEQ_LEN) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- 1. uniform denoiser: the expected NELBO is log V per token ------------------------------------

@pytest.mark.parametrize("name", list(FIXED))
def test_uniform_denoiser_expected_nelbo_is_log_v(name):
    """Exact expectation of the estimator, derived for the configured truncation (not made tiny).

    With x_theta uniform over V tokens, F(z) = log V * sum_i z_i A_i(t), and
    E_z[sum_i z_i A_i] = sum_i (1 - alpha_i) A_i = -sum_i alpha_i'(t). The estimator draws
    t = t_eps + (1 - t_eps) u with u ~ U[0, 1) (stratified), so its expectation per token is
        log V * mean_i (alpha_i(t_eps) - alpha_i(1)) / (1 - t_eps),
    which is log V as t_eps, mdlm_eps, window_eps -> 0 (e.g. (1 - mdlm_eps) log V for MDLM).
    """
    cfg = FIXED[name]
    scheduler = build_scheduler(cfg)
    te = cfg.t_eps
    drop = masked_prob_closed_form(cfg, np.array(1.0)) - masked_prob_closed_form(cfg, np.array(te))
    expected = math.log(V) * float(drop.mean()) / (1.0 - te)

    # The scheduler's own integrand, integrated over [t_eps, 1], gives the same number.
    breaks = list(np.geomspace(te, 1.0, 40)) + [m / SEQ_LEN for m in range(SEQ_LEN + 1)]
    nodes, weights = piecewise_nodes(breaks, te, 1.0)
    sched = scheduler.schedule(torch.from_numpy(nodes), SEQ_LEN)
    integrand = (sched.log_masked.exp() * sched.velocity).mean(-1).numpy() * math.log(V)
    assert float(integrand @ weights) / (1.0 - te) == pytest.approx(expected, rel=1e-9)
    if name in ("mdlm_eps0.2", "poly_0.7_teps0.3"):
        assert expected < 0.85 * math.log(V)  # truncation visible: the naive log V would fail below

    # Untruncated, the integrand integrates to log V per token (MDLM: (1 - mdlm_eps) log V). The
    # poly integrand c t^(c-1) is singular at 0; what lies below 1e-12 is below 1e-8 of the total.
    breaks = list(np.geomspace(1e-12, 1.0, 120)) + [m / SEQ_LEN for m in range(SEQ_LEN + 1)]
    nodes, weights = piecewise_nodes(breaks, 1e-12, 1.0)
    sched = scheduler.schedule(torch.from_numpy(nodes), SEQ_LEN)
    per_token = float((sched.log_masked.exp() * sched.velocity).mean(-1).numpy() @ weights)
    assert per_token == pytest.approx(1.0 - (cfg.mdlm_eps if cfg.scheduler == "mdlm" else 0.0), abs=1e-7)

    model = toy_model(V + 1, SEQ_LEN, uniform=True)
    batch = 256
    x = random_tokens(batch, seed=1)
    per_step = []
    for step in range(200):
        out = diffusion_loss(model, scheduler, x, StepSpec(seed=7, step=step, rows=torch.arange(batch),
                                                            global_batch=batch), cfg=cfg)
        assert out.l_velocity.item() == 0.0
        per_step.append(out.nelbo.item())
    mean, se = batch_mean_and_se(per_step)
    assert abs(mean - expected) <= Z_LIMIT * se, (mean, expected, se)
    assert se < 0.01 * expected  # the check resolves 1% of the NELBO


# --- 2. MDLM ---------------------------------------------------------------------------------------

def mdlm_reference_loss(model, x: torch.Tensor, rows: torch.Tensor, *, seed: int, step: int, global_batch: int,
                        eps: float, t_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MDLM's training loss (kuleshov-group/mdlm ``diffusion.py``), on the same t and masks.

    Log-linear noise sigma(t) = -log(1 - (1 - eps) t), move chance 1 - exp(-sigma), SUBS log-probs,
    loss -log p * dsigma / expm1(sigma), averaged over all tokens. Returns (token mean, per-row sums).
    The objective conditions a time-conditioned backbone on t itself, so the reference does too.
    """
    t = randomness.diffusion_times(seed, step, rows, global_batch, t_eps=t_eps)
    sigma = -torch.log1p(-(1.0 - eps) * t)
    dsigma = (1.0 - eps) / (1.0 - (1.0 - eps) * t)
    move_chance = 1.0 - torch.exp(-sigma)
    u = randomness.uniform(seed, step, randomness.STREAM_MASK, rows, x.shape[1])
    z = torch.where(u < move_chance[:, None], torch.full_like(x, model.mask_token_id), x)
    cond = t.float() if model.backbone.time_conditioning else None
    loss = token_nll(model, z, x, cond) * (dsigma / torch.expm1(sigma))[:, None]
    return loss.sum() / x.numel(), loss.sum(-1)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_mdlm_scheduler_gives_the_mdlm_loss(time_conditioning):
    cfg = DiffusionConfig(scheduler="mdlm", mdlm_eps=1e-3, t_eps=1e-3)
    model = toy_model(V + 1, SEQ_LEN, time_conditioning=time_conditioning, seed=3)
    rows = torch.arange(16, 48)
    x = random_tokens(len(rows), seed=2)
    out = diffusion_loss(model, build_scheduler(cfg), x, StepSpec(seed=11, step=4, rows=rows, global_batch=64), cfg=cfg)
    ref_loss, ref_rows = mdlm_reference_loss(model, x, rows, seed=11, step=4, global_batch=64,
                                             eps=cfg.mdlm_eps, t_eps=cfg.t_eps)
    # float32 against float64: a sum of 32 x 8 token terms, each a log-sum-exp over V + 1 logits from
    # length-8 dot products, all positive: (256 + V + 1 + 8) * 2^-24 relative; a row sums 8 terms.
    torch.testing.assert_close(out.loss.double(), ref_loss, rtol=(256 + V + 9) * 2**-24, atol=0)
    torch.testing.assert_close(out.nelbo.double(), ref_loss, rtol=(256 + V + 9) * 2**-24, atol=0)
    torch.testing.assert_close(out.row_nelbo, ref_rows, rtol=(8 + V + 9) * 2**-24, atol=0)
    assert out.l_velocity.item() == 0.0

    params = [p for p in model.parameters()]
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    want = torch.autograd.grad(ref_loss, params, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        # Each entry sums up to 256 token contributions through length-8 mixes: its rounding is
        # relative to the contributions' size (the tensor's largest entry), not to the entry.
        torch.testing.assert_close(g, w.float(), rtol=0, atol=(256 + 2 * 8) * 2**-24 * float(w.abs().max()))


# --- 3. velocity matching ---------------------------------------------------------------------------

def test_velocity_term_is_a_nonnegative_bregman_divergence():
    gen = torch.Generator().manual_seed(0)
    n, vocab = 300, 11
    logits = torch.randn(n, vocab, generator=gen) * 3
    targets = torch.randint(0, vocab - 1, (n,), generator=gen)
    A = torch.exp(torch.empty(n).uniform_(-7, 7, generator=gen))
    A_hat = A * torch.exp(torch.empty(n).uniform_(-3, 3, generator=gen))
    A_hat[:40] = A[:40] * (1 + torch.empty(40).uniform_(-1e-3, 1e-3, generator=gen))  # near the minimum
    A_hat.requires_grad_(True)
    l_main, l_vel = velocity_loss(logits, targets, A, A_hat, mask_token_id=vocab - 1)

    # Bregman divergence of f(a) = a log a - a between A and A_hat, in float64.
    a, b = A.double(), A_hat.detach().double()
    def f(v):
        return v * v.log() - v
    bregman = f(a) - f(b) - b.log() * (a - b)
    assert bool((l_vel >= 0).all())
    torch.testing.assert_close(l_vel.double(), bregman, rtol=1e-4, atol=1e-9)
    # Cross-entropy over the real tokens (mask column dropped) times A.
    ce = F.cross_entropy(logits[:, :-1].double(), targets, reduction="none")
    torch.testing.assert_close(l_main.double(), A.double() * ce, rtol=1e-5, atol=1e-6)
    # d l_vel / d A_hat = 1 - A / A_hat.
    (grad,) = torch.autograd.grad(l_vel.sum(), A_hat)
    torch.testing.assert_close(grad.double(), 1.0 - a / b, rtol=1e-4, atol=1e-6)


def test_velocity_term_and_its_gradient_vanish_at_a_hat_equal_a():
    gen = torch.Generator().manual_seed(1)
    n, vocab = 200, 9
    logits = torch.randn(n, vocab, generator=gen)
    targets = torch.randint(0, vocab - 1, (n,), generator=gen)
    A = torch.exp(torch.empty(n).uniform_(-8, 8, generator=gen))
    A_hat = A.clone().requires_grad_(True)
    _, l_vel = velocity_loss(logits, targets, A, A_hat, mask_token_id=vocab - 1)
    assert torch.equal(l_vel, torch.zeros(n))
    (grad,) = torch.autograd.grad(l_vel.sum(), A_hat)
    assert torch.equal(grad, torch.zeros(n))


@pytest.mark.parametrize("kind", ["toy", "real"])
def test_no_gradient_reaches_psi_when_c2_is_zero(kind):
    model = toy_model(V + 1, SEQ_LEN, learned=True, seed=5) if kind == "toy" else real_model("lomdm", seed=5)
    x = random_tokens(8, seed=4)

    def grads(c2):
        cfg = DiffusionConfig(scheduler="lomdm", c1=0.7, c2=c2)
        model.zero_grad(set_to_none=True)
        out = diffusion_loss(model, build_scheduler(cfg), x, StepSpec(seed=2, step=1, rows=torch.arange(8),
                                                                    global_batch=8), cfg=cfg)
        out.loss.backward()
        return out, {name: (p.grad if p.grad is not None else torch.zeros_like(p))
                     for name, p in model.named_parameters()}

    out, g = grads(0.0)
    assert out.l_velocity.item() == 0.0
    assert all(torch.equal(v, torch.zeros_like(v)) for name, v in g.items() if name.startswith(("psi.", "phi.")))
    assert any(bool(v.any()) for name, v in g.items() if name.startswith("backbone."))
    # Control: with c2 > 0 the exponents differ, L_velocity > 0 and both heads are trained.
    out, g = grads(0.65)
    assert out.l_velocity.item() > 0.0
    assert any(bool(v.any()) for name, v in g.items() if name.startswith("psi."))
    assert any(bool(v.any()) for name, v in g.items() if name.startswith("phi."))


# --- 4. layout invariance ----------------------------------------------------------------------------

LAYOUTS = {
    "mdlm-toy": ("mdlm", lambda: toy_model(V + 1, SEQ_LEN, time_conditioning=True, seed=8)),
    "arm-toy": ("arm", lambda: toy_model(V + 1, SEQ_LEN, seed=8)),
    "lomdm-toy": ("lomdm", lambda: toy_model(V + 1, SEQ_LEN, learned=True, seed=8)),
    "lomdm-real": ("lomdm", lambda: real_model("lomdm", seed=8)),
    "block-real-timecond": ("block", lambda: real_model("block", seed=8, time_conditioning=True)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_split_batch_gives_the_same_rows_loss_and_gradient(name):
    scheduler_name, make = LAYOUTS[name]
    model = make()
    cfg = DiffusionConfig(scheduler=scheduler_name, block_size=4)
    scheduler = build_scheduler(cfg)
    x = random_tokens(8, seed=6)
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[2, 5:] = False
    valid[6, 3:] = False
    rows = torch.arange(8)
    total = valid.sum().float()
    spec = dict(seed=9, step=3, global_batch=8, normalizer=total)

    full = diffusion_loss(model, scheduler, x, StepSpec(rows=rows, **spec), cfg=cfg, valid=valid)
    full_grads = torch.autograd.grad(full.loss, [p for p in model.parameters()], allow_unused=True)
    halves = [diffusion_loss(model, scheduler, x[s], StepSpec(rows=rows[s], **spec), cfg=cfg, valid=valid[s])
              for s in (slice(0, 4), slice(4, 8))]
    half_grads = [torch.autograd.grad(h.loss, [p for p in model.parameters()], allow_unused=True) for h in halves]

    # The same float32 operations on 4 or 8 rows: sums of 8 x 2 x L token terms (and the RLOO
    # surrogate's cancelling terms: measured against the size of the NELBO, which bounds them here).
    n = 8 * 2 * SEQ_LEN + V + 9
    torch.testing.assert_close(torch.cat([h.row_nelbo for h in halves]), full.row_nelbo, rtol=n * 2**-24, atol=0)
    scale = float(full.nelbo.detach().abs()) + float(full.loss.detach().abs())
    torch.testing.assert_close(halves[0].loss + halves[1].loss, full.loss, rtol=0, atol=n * 2**-24 * scale)
    torch.testing.assert_close(halves[0].nelbo + halves[1].nelbo, full.nelbo, rtol=n * 2**-24, atol=0)
    # A gradient entry's rounding is relative to its contributions, bounded by the largest gradient
    # entry of the model (a head's bias has contributions that cancel to exactly 0 under the centred
    # NormSig, leaving rounding only).
    largest = max(float(g.abs().max()) for g in full_grads if g is not None)
    for gf, g0, g1 in zip(full_grads, *half_grads):
        if gf is None:
            assert g0 is None and g1 is None
            continue
        torch.testing.assert_close(g0 + g1, gf, rtol=0, atol=n * 2**-24 * largest)
    assert full.tokens.item() == total.item()


# --- padding ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mdlm", "lomdm"])
def test_padding_is_masked_like_any_position_but_never_scored(name):
    """MDLM's forward process masks every position, padding included, and leaves padding out of the
    loss: the denoiser must not be able to read a row's length off unmasked padding. Padding here is
    the last 5 positions of every row; the masked copies the backbone sees and the tokens the loss
    scores are recorded."""
    cfg = DiffusionConfig(scheduler=name)
    model = toy_model(7, SEQ_LEN, learned=name == "lomdm", seed=3)
    seen, scored = [], []
    features = model.backbone.features
    model.backbone.features = lambda tokens, c: seen.append(tokens.clone()) or features(tokens, c)

    def recording_loss(logits, targets, A, A_hat, *, mask_token_id):
        scored.append(targets.numel())
        return velocity_loss(logits, targets, A, A_hat, mask_token_id=mask_token_id)

    B = 64
    x = random_tokens(B, seed=4)
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[:, -5:] = False
    num_masks = cfg.resolved_masks_per_row()
    out = diffusion_loss(model, build_scheduler(cfg), x, StepSpec(seed=1, step=0, rows=torch.arange(B), global_batch=B),
                         cfg=cfg, valid=valid, passes=PlainPasses(model, token_loss=recording_loss))
    z = seen[-1].reshape(num_masks, B, SEQ_LEN)
    masked = z == model.mask_token_id
    pad_masked = masked[:, :, -5:].double().mean()
    # Padding positions are masked about as often as real ones (P = t^k, averaged over the batch's t).
    assert 0.15 < float(pad_masked) < 0.85
    assert abs(float(pad_masked) - float(masked[:, :, :-5].double().mean())) < 0.15
    # ... but only masked real tokens are scored, and the token count excludes padding.
    assert scored[-1] == int(masked[:, :, :-5].sum())
    assert float(out.tokens) == float(valid.sum())
    assert float(out.stats["masked_fraction"]) == pytest.approx(float(masked[:, :, :-5].double().mean()), rel=1e-6)
