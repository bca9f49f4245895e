"""The OeMDM NELBO objective and the three-pass LoMDM training step.

Per masked position i of a noisy row z (paper Eq. 2, docs/method.md section 3):

    L_main     = -A_i log x_theta(z)_i[x_i]                      (SUBS: mask logit excluded)
    L_velocity =  A_i (log A_i - log A_hat_i) - (A_i - A_hat_i)   (0 for fixed schedulers: A_hat = A)

F_r = sum over masked real positions i of (L_main + L_velocity) for mask r, times the importance
weight of the row's t, is a one-sample estimate of the NELBO of the row (padding is masked like any
position but never scored). Both terms are computed with the t-scaled velocities v = A t and the
row's sum is multiplied by w(t) / t (``time_sampling``), so no velocity overflows near t = 0. For the learned (lomdm) scheduler, masks are drawn from q_phi, so phi also gets the
score-function gradient, estimated with RLOO over K masks that share t (K = 2 in the paper):

    surrogate = mean_r F_r + (1/K) sum_r sg(F_r - mean_{j != r} F_j) * log q_phi(z_r | x)

The three passes: backbone on clean x without grad (features for phi), then one batched pass over
the K masked copies (logits for theta, features for psi). Logits are computed only at masked
positions: unmasked positions carry zero loss under SUBS, so their vocabulary projection is skipped.

The step is written as the pieces a distributed step needs, and ``diffusion_loss`` chains them.
Pipeline parallelism has to stop between the passes (the masks depend on the last stage's phi
head, and each masked microbatch's loss is computed at the last stage), and tensor parallelism
computes the per-token loss on vocabulary slices (``token_loss``); ``lomdm_dist.parallel`` calls
the same pieces, so every layout runs one implementation of the formulas:

1. :func:`step_randomness`: t with its weight and the mask uniforms, pure functions of (seed, step,
   global row);
2. :func:`clean_features` and :func:`draw_exponents`: pass 1 and the exponents k_phi (lomdm);
3. :func:`draw_masks` and :func:`masked_copies`: the K masked copies of each row, copy-major;
4. :func:`masked_pass_loss`: from the backbone features of the masked copies, the per-row NELBO
   terms and the RLOO surrogate (the phi head applied, with grad, to detached clean features);
5. :func:`assemble_loss`: sums over row sets (microbatches) into one :class:`LossOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor

from kernels.velocity_loss import velocity_loss

from ..config import DiffusionConfig
from . import randomness
from .schedulers import LoMDMScheduler, Scheduler
from .time_sampling import TimeDraw, build_time_sampler


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


class TokenLoss(Protocol):
    """Per-token ``(l_main, l_velocity)`` from logits: ``kernels.velocity_loss.velocity_loss`` on one
    device, its vocab-parallel form under tensor parallelism."""

    def __call__(self, logits: Tensor, targets: Tensor, A: Tensor, A_hat: Tensor, *,
                 mask_token_id: int) -> tuple[Tensor, Tensor]: ...


def rloo_term(F: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """(1/K) sum_r sg(F_r - mean_{j != r} F_j) log q_r, per row. F, log_q: (K, B)."""
    K = F.shape[0]
    F = F.detach()
    baseline = (F.sum(0, keepdim=True) - F) / (K - 1)
    return ((F - baseline) * log_q).mean(0)


def step_randomness(*, seed: int, step: int, rows: Tensor, global_batch: int, seq_len: int, num_masks: int,
                    cfg: DiffusionConfig, time_stream: int = randomness.STREAM_TIME,
                    mask_stream: int = randomness.STREAM_MASK) -> tuple[TimeDraw, Tensor]:
    """(times (B,) with their weights, uniforms (K, B, L) float64) for the global ``rows``."""
    u = randomness.stratified_uniforms(seed, step, rows, global_batch, antithetic=cfg.antithetic, stream=time_stream)
    times = build_time_sampler(cfg).draw(u)
    uniforms = torch.stack([randomness.uniform(seed, step, mask_stream + r, rows, seq_len)
                            for r in range(num_masks)])
    return times, uniforms


def draw_masks(scheduler: Scheduler, times: TimeDraw, uniforms: Tensor, k_draw: Tensor | None = None) -> Tensor:
    """(K, B, L) bool masks: position masked when its uniform is below P(masked at t).

    Padding is masked like any position (as MDLM's forward process does); the loss leaves it out.
    Masking it keeps the length of a padded row hidden from the denoiser and the psi head. For the
    learned scheduler ``k_draw`` holds the exponents k_phi (B, L) of pass 1 (c1 at padding).
    """
    if scheduler.learned:
        if k_draw is None:
            raise ValueError("draw_masks: the lomdm scheduler needs the exponents k_phi of the clean pass")
        p_masked = torch.exp(k_draw.double() * times.log_t[:, None])
    else:
        p_masked = torch.exp(scheduler.schedule(times.t, uniforms.shape[-1]).log_masked)
    return uniforms < p_masked


def masked_copies(x: Tensor, masks: Tensor, mask_token_id: int) -> Tensor:
    """(K * B, L) tokens: copy r of row b at index r * B + b, masked positions set to the mask id."""
    K, B, L = masks.shape
    return torch.where(masks, torch.full_like(x, mask_token_id), x.unsqueeze(0)).reshape(K * B, L)


def conditioning_sigma(backbone, t: Tensor) -> Tensor:
    """The sigma the backbone is conditioned on: t with time conditioning, zeros otherwise
    (``conditioning`` ignores it then; a tensor is still passed so pipeline inputs keep one shape)."""
    return t if backbone.time_conditioning else torch.zeros_like(t)


def clean_features(model, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Pass 1: (h_clean without grad, c_clean) of the clean rows."""
    backbone = model.backbone
    c_clean = backbone.conditioning(x.shape[0], conditioning_sigma(backbone, torch.zeros_like(t)))
    with torch.no_grad():
        h_clean = backbone.features(x, c_clean)
    return h_clean, c_clean


def draw_exponents(scheduler: LoMDMScheduler, g_phi: Tensor, t: Tensor, valid: Tensor) -> Tensor:
    """k_phi (B, L) without grad from the phi head's output: the exponents the masks are drawn with."""
    with torch.no_grad():
        return scheduler.exponents(g_phi.detach(), t, valid).k


SATURATION_SLOPE = 1e-3
"""A sigmoid counts as saturated where its slope sigma' is below this (|input| > 6.9): its
position then barely moves its exponent, whatever the gradient."""


@dataclass
class PassLoss:
    """Loss terms of a set of rows (a whole local batch or one pipeline microbatch)."""

    surrogate: Tensor
    """(B,) surrogate per row (differentiable)."""
    F_main: Tensor
    """(K, B) detached sums of l_main per masked copy."""
    F_vel: Tensor
    """(K, B) detached sums of l_velocity per masked copy."""
    sums: dict[str, Tensor] = field(default_factory=dict)
    """Detached sums and counts the step statistics are made of (added across microbatches)."""


def _f64(value: float, device) -> Tensor:
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def _order_sums(prefix: str, k: Tensor, saturated: Tensor | None = None) -> dict[str, Tensor]:
    """Sum, square sum and count of exponents (and the count of saturated sigmoids) for statistics."""
    k = k.detach().double()
    sums = {f"{prefix}_sum": k.sum(), f"{prefix}_sqsum": (k ** 2).sum(), f"{prefix}_count": _f64(k.numel(), k.device)}
    if saturated is not None:
        sums[f"{prefix}_saturated"] = saturated.double().sum()
    return sums


def _saturated(sig_input: Tensor) -> Tensor:
    sig = torch.sigmoid(sig_input.detach().float())
    return sig * (1.0 - sig) < SATURATION_SLOPE


def masked_pass_loss(model, scheduler: Scheduler, *, h: Tensor, c: Tensor, x: Tensor, valid: Tensor,
                     masks: Tensor, times: TimeDraw, cfg: DiffusionConfig, g_phi: Tensor | None = None,
                     h_clean: Tensor | None = None, c_clean: Tensor | None = None,
                     token_loss: TokenLoss = velocity_loss) -> PassLoss:
    """NELBO terms and RLOO surrogate of rows ``x`` (B, L) from the features ``h`` (K*B, L, d) of
    their masked copies (conditioning ``c`` (K*B, cond_dim)).

    Token losses are computed with the t-scaled velocities v = A t (k for lomdm, so finite at any
    t) and each row's sum is multiplied by ``times.row_weight`` = w(t) / t (see
    ``lomdm_dist.diffusion.time_sampling``); only masked, non-padding positions are scored.

    For the learned scheduler ``g_phi`` (B, L) is the phi head's output with grad; when it is not
    given, the head is applied here to the stored clean features ``h_clean`` (B, L, d) (detached
    inside the head) and ``c_clean``. Its exponents equal the ones the masks were drawn with
    because the head has no dropout.
    """
    backbone = model.backbone
    K, B, L = masks.shape
    sums: dict[str, Tensor] = {}
    log_q = None
    if scheduler.learned:
        if g_phi is None:
            if h_clean is None or c_clean is None:
                raise ValueError("masked_pass_loss: the lomdm scheduler needs g_phi or the clean features "
                                 "h_clean and c_clean")
            g_phi = model.phi(h_clean, c_clean).float()
        sched = scheduler.exponents(g_phi, times.t, valid, masks=masks)
        scaled_velocity, log_q = sched.k, sched.log_q
        g_in = scheduler.normsig_input(g_phi.detach(), valid)
        sums.update(_order_sums("k_phi", sched.k[valid], _saturated(g_in[valid])))
        sums.update(g_phi_sum=g_phi.detach()[valid].double().sum())
    else:
        schedule = scheduler.schedule(times.t, L)
        scaled_velocity = (schedule.velocity * times.t[:, None]).to(torch.float32)

    loss_positions = (masks & valid).reshape(K * B, L)
    row_of_token = loss_positions.nonzero(as_tuple=True)[0]
    logits = backbone.output_logits(h[loss_positions], c[row_of_token])
    targets = x.repeat(K, 1)[loss_positions]
    v = scaled_velocity.unsqueeze(0).expand(K, B, L).reshape(K * B, L)[loss_positions]
    if scheduler.learned:
        # psi sees only z_t, so its NormSig runs over every position, as when sampling.
        every = torch.ones(K * B, L, dtype=torch.bool, device=x.device)
        g_psi = model.psi(h, c).float()
        k_hat = scheduler.exponents(g_psi, times.t.repeat(K), every).k
        v_hat = k_hat[loss_positions]
        valid_rep = valid.repeat(K, 1)
        sums.update(_order_sums("k_hat", k_hat[valid_rep],
                                _saturated(scheduler.normsig_input(g_psi.detach(), every)[valid_rep])))
    else:
        v_hat = v
    l_main, l_vel = token_loss(logits, targets, v.float(), v_hat.float(), mask_token_id=model.mask_token_id)

    weight = times.row_weight.repeat(K).to(torch.float32)
    zeros = torch.zeros(K * B, device=x.device, dtype=torch.float32)
    F_main = (zeros.index_add(0, row_of_token, l_main) * weight).view(K, B)
    F_vel = (zeros.index_add(0, row_of_token, l_vel) * weight).view(K, B)
    F = F_main + F_vel
    surrogate = F.mean(0)
    if log_q is not None and K > 1:
        surrogate = surrogate + rloo_term(F, log_q)
    sums.update(masked=(masks & valid).sum().double(), valid_copies=(valid.sum() * K).double(),
                t_sum=times.t.sum().double(), rows=_f64(B, x.device))
    return PassLoss(surrogate=surrogate, F_main=F_main.detach(), F_vel=F_vel.detach(), sums=sums)


def _statistics(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Step statistics from the sums over all row sets: mean and (unbiased) std over valid positions
    of k_phi and k_hat (the spread is what says whether an order is learned), the share of their
    saturated sigmoids, the mean of g_phi, masked fraction, mean t."""
    stats: dict[str, Tensor] = {}
    for prefix in ("k_phi", "k_hat"):
        if f"{prefix}_sum" not in sums:
            continue
        n = sums[f"{prefix}_count"]
        mean = sums[f"{prefix}_sum"] / n.clamp(min=1)
        var = (sums[f"{prefix}_sqsum"] - n * mean ** 2) / (n - 1).clamp(min=1)
        stats[f"{prefix}_mean"] = mean.float()
        stats[f"{prefix}_std"] = var.clamp(min=0).sqrt().float()
        stats[f"{prefix}_saturated"] = (sums[f"{prefix}_saturated"] / n.clamp(min=1)).float()
    if "g_phi_sum" in sums:
        stats["g_phi_mean"] = (sums["g_phi_sum"] / sums["k_phi_count"].clamp(min=1)).float()
    stats["masked_fraction"] = (sums["masked"] / sums["valid_copies"].clamp(min=1)).float()
    stats["t_mean"] = (sums["t_sum"] / sums["rows"]).float()
    return stats


def assemble_loss(parts: list[PassLoss], *, normalizer: Tensor | float, tokens: Tensor,
                  loss: Tensor | None = None, reduce_sums: Callable[[Tensor], Tensor] | None = None) -> LossOutput:
    """One ``LossOutput`` from the loss terms of consecutive row sets (microbatches, in row order).

    ``loss`` overrides the differentiable sum (a pipeline schedule has already back-propagated the
    per-microbatch losses; it passes their detached sum). ``reduce_sums`` sums the statistics'
    numerators and counts over data-parallel ranks, so ``stats`` describe the global batch.
    """
    F_main = torch.cat([p.F_main for p in parts], dim=1)
    F_vel = torch.cat([p.F_vel for p in parts], dim=1)
    F = F_main + F_vel
    if loss is None:
        loss = sum(p.surrogate.sum() for p in parts) / normalizer
    sums: dict[str, Tensor] = {}
    for p in parts:
        for key, value in p.sums.items():
            sums[key] = sums[key] + value if key in sums else value
    if reduce_sums is not None:
        keys = sorted(sums)
        reduced = reduce_sums(torch.stack([sums[k].double().reshape(()) for k in keys]))
        sums = {k: reduced[i] for i, k in enumerate(keys)}
    return LossOutput(loss=loss, nelbo=F.mean(0).sum() / normalizer, l_main=F_main.mean(0).sum() / normalizer,
                      l_velocity=F_vel.mean(0).sum() / normalizer, row_nelbo=F.double().mean(0), tokens=tokens,
                      stats=_statistics(sums))


def diffusion_loss(model, scheduler: Scheduler, x: torch.Tensor, *, cfg: DiffusionConfig, seed: int, step: int,
                   rows: torch.Tensor, global_batch: int, valid: torch.Tensor | None = None,
                   num_masks: int | None = None, normalizer: float | torch.Tensor | None = None,
                   time_stream: int = randomness.STREAM_TIME, mask_stream: int = randomness.STREAM_MASK,
                   token_loss: TokenLoss = velocity_loss,
                   reduce_sums: Callable[[Tensor], Tensor] | None = None) -> LossOutput:
    """One NELBO estimate for the rows ``x`` (B, L) of the global batch at ``step``.

    ``rows`` holds the global index of each local row: t and the masks are functions of
    (seed, step, row), so the result for a row does not depend on how the batch is split.
    ``normalizer`` defaults to the local number of valid tokens; the distributed trainer passes the
    global count so that summed gradients equal the single-process ones. ``token_loss`` and
    ``reduce_sums`` are the tensor- and data-parallel hooks (see the module docstring).
    """
    backbone = model.backbone
    B, L = x.shape
    if valid is None:
        valid = torch.ones_like(x, dtype=torch.bool)
    K = num_masks or cfg.resolved_masks_per_row()
    tokens = valid.sum().to(torch.float32)
    if normalizer is None:
        normalizer = tokens.clamp(min=1.0)
    times, uniforms = step_randomness(seed=seed, step=step, rows=rows.to(x.device), global_batch=global_batch,
                                      seq_len=L, num_masks=K, cfg=cfg, time_stream=time_stream,
                                      mask_stream=mask_stream)
    t = times.t.to(torch.float32)
    g_phi = k_draw = None
    if scheduler.learned:
        # Pass 1: clean features for the forward scheduler (no gradient to the backbone).
        h_clean, c_clean = clean_features(model, x, t)
        g_phi = model.phi(h_clean, c_clean).float()
        k_draw = draw_exponents(scheduler, g_phi, times.t, valid)
    masks = draw_masks(scheduler, times, uniforms, k_draw)
    # Passes 2..K+1: the K masked copies in one batch.
    z = masked_copies(x, masks, model.mask_token_id)
    c = backbone.conditioning(K * B, conditioning_sigma(backbone, t.repeat(K)))
    h = backbone.features(z, c)
    part = masked_pass_loss(model, scheduler, h=h, c=c, x=x, valid=valid, masks=masks, times=times, cfg=cfg,
                            g_phi=g_phi, token_loss=token_loss)
    return assemble_loss([part], normalizer=normalizer, tokens=tokens, reduce_sums=reduce_sums)
