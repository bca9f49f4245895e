"""The OeMDM NELBO objective and the three-pass LoMDM training step.

Per masked position i of a noisy row z (paper Eq. 2, docs/method.md section 3):

    L_main     = -A_i log x_theta(z)_i[x_i]                      (SUBS: mask logit excluded)
    L_velocity =  A_i (log A_i - log A_hat_i) - (A_i - A_hat_i)   (0 for fixed schedulers: A_hat = A)

F_r = sum over masked i of (L_main + L_velocity) for mask r is a one-sample estimate of the NELBO of
the row. For the learned (lomdm) scheduler, masks are drawn from q_phi, so phi also gets the
score-function gradient, estimated with RLOO over K masks that share t (K = 2 in the paper):

    surrogate = mean_r F_r + (1/K) sum_r sg(F_r - mean_{j != r} F_j) * log q_phi(z_r | x)

The three passes: backbone on clean x without grad (features for phi), then one batched pass over
the K masked copies (logits for theta, features for psi). Logits are computed only at masked
positions: unmasked positions carry zero loss under SUBS, so their vocabulary projection is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.scheduler import lomdm_schedule
from kernels.velocity_loss import velocity_loss

from ..config import DiffusionConfig
from . import randomness
from .schedulers import Scheduler


@dataclass
class LossOutput:
    loss: torch.Tensor
    """Scalar to back-propagate: surrogate summed over rows divided by ``normalizer``."""
    nelbo: torch.Tensor
    """Detached per-token NELBO estimate (L_main + L_velocity), same normalisation."""
    l_main: torch.Tensor
    l_velocity: torch.Tensor
    row_nelbo: torch.Tensor
    """Detached (B,) NELBO of each row (mean over its masks), float64, in nats per row."""
    tokens: torch.Tensor
    """Valid tokens of the local batch (float)."""
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached diagnostics: exponent statistics, masked fraction, mean t."""


def rloo_term(F: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """(1/K) sum_r sg(F_r - mean_{j != r} F_j) log q_r, per row. F, log_q: (K, B)."""
    K = F.shape[0]
    F = F.detach()
    baseline = (F.sum(0, keepdim=True) - F) / (K - 1)
    return ((F - baseline) * log_q).mean(0)


def diffusion_loss(model, scheduler: Scheduler, x: torch.Tensor, *, cfg: DiffusionConfig, seed: int, step: int,
                   rows: torch.Tensor, global_batch: int, valid: torch.Tensor | None = None,
                   num_masks: int | None = None, normalizer: float | torch.Tensor | None = None,
                   time_stream: int = randomness.STREAM_TIME,
                   mask_stream: int = randomness.STREAM_MASK) -> LossOutput:
    """One NELBO estimate for the rows ``x`` (B, L) of the global batch at ``step``.

    ``rows`` holds the global index of each local row: t and the masks are functions of
    (seed, step, row), so the result for a row does not depend on how the batch is split.
    ``normalizer`` defaults to the local number of valid tokens; the distributed trainer passes the
    global count so that summed gradients equal the single-process ones.
    """
    backbone = model.backbone
    B, L = x.shape
    device = x.device
    if valid is None:
        valid = torch.ones_like(x, dtype=torch.bool)
    K = num_masks or cfg.resolved_masks_per_row()
    tokens = valid.sum().to(torch.float32)
    if normalizer is None:
        normalizer = tokens.clamp(min=1.0)

    t64 = randomness.diffusion_times(seed, step, rows.to(device), global_batch, t_eps=cfg.t_eps,
                                     antithetic=cfg.antithetic, stream=time_stream)
    t = t64.to(torch.float32)
    time_sigma = (lambda tt: tt) if backbone.time_conditioning else (lambda tt: None)
    uniforms = torch.stack([randomness.uniform(seed, step, mask_stream + r, rows.to(device), L) for r in range(K)])

    log_q = None
    stats: dict[str, torch.Tensor] = {}
    if scheduler.learned:
        # Pass 1: clean features for the forward scheduler (no gradient to the backbone).
        c_clean = backbone.conditioning(B, time_sigma(torch.zeros_like(t)))
        with torch.no_grad():
            h_clean = backbone.features(x, c_clean)
        g_phi = model.phi(h_clean, c_clean).float()
        with torch.no_grad():
            k_draw = lomdm_schedule(g_phi, t, valid, cfg.c1, cfg.c2, k_min=cfg.k_min).k
            p_masked = torch.exp(k_draw.double() * torch.log(t64)[:, None])
        masks = (uniforms < p_masked) & valid
        sched = lomdm_schedule(g_phi, t, valid, cfg.c1, cfg.c2, masks=masks, k_min=cfg.k_min)
        velocity, log_q = sched.velocity, sched.log_q
        stats["k_phi_mean"] = sched.k[valid].mean().detach()
        stats["k_phi_std"] = sched.k[valid].std().detach() if valid.sum() > 1 else torch.zeros((), device=device)
    else:
        sched = scheduler.schedule(t64, L)
        masks = (uniforms < torch.exp(sched.log_masked)) & valid
        velocity = sched.velocity.to(torch.float32)

    # Passes 2..K+1: the K masked copies in one batch.
    z = torch.where(masks, torch.full_like(x, model.mask_token_id), x.unsqueeze(0)).reshape(K * B, L)
    t_rep = t.repeat(K)
    c = backbone.conditioning(K * B, time_sigma(t_rep))
    h = backbone.features(z, c)
    sel = masks.reshape(K * B, L)
    row_of_token = sel.nonzero(as_tuple=True)[0]
    logits = backbone.output_logits(h[sel], c[row_of_token])
    targets = x.repeat(K, 1)[sel]
    A = velocity.unsqueeze(0).expand(K, B, L).reshape(K * B, L)[sel]
    if scheduler.learned:
        valid_rep = valid.repeat(K, 1)
        k_hat = lomdm_schedule(model.psi(h, c).float(), t_rep, valid_rep, cfg.c1, cfg.c2, k_min=cfg.k_min).k
        A_hat = (k_hat / t_rep[:, None])[sel]
        stats["k_hat_mean"] = k_hat[valid_rep].mean().detach()
    else:
        A_hat = A
    l_main, l_vel = velocity_loss(logits, targets, A.float(), A_hat.float(), mask_token_id=model.mask_token_id)

    F_main = torch.zeros(K * B, device=device, dtype=torch.float32).index_add(0, row_of_token, l_main).view(K, B)
    F_vel = torch.zeros(K * B, device=device, dtype=torch.float32).index_add(0, row_of_token, l_vel).view(K, B)
    F = F_main + F_vel
    surrogate = F.mean(0)
    if log_q is not None and K > 1:
        surrogate = surrogate + rloo_term(F, log_q)

    stats["masked_fraction"] = (masks.sum() / (valid.sum() * K).clamp(min=1)).detach().float()
    stats["t_mean"] = t.mean().detach()
    return LossOutput(
        loss=surrogate.sum() / normalizer,
        nelbo=(F.detach().mean(0).sum() / normalizer),
        l_main=(F_main.detach().mean(0).sum() / normalizer),
        l_velocity=(F_vel.detach().mean(0).sum() / normalizer),
        row_nelbo=F.detach().double().mean(0),
        tokens=tokens,
        stats=stats,
    )
