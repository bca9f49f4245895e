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

``diffusion_loss`` is the only chain of the step; every layout runs it. What differs between
layouts is where the features come from, which a :class:`Passes` object answers:
:class:`PlainPasses` runs the whole model (one process, or tensor / sequence / data parallel), and
``lomdm_dist.parallel.pipeline.PipelinePasses`` runs the passes as pipeline schedules (a
forward-only pass over the clean rows with the exponents sent back to every stage, then 1F1B over
the masked microbatches with the loss at the last stage). The chain:

1. :func:`step_randomness`: t with its weight and the mask uniforms, pure functions of the
   :class:`StepSpec` (seed, step, global rows, streams);
2. pass 1 (learned scheduler): ``Passes.clean_pass`` gives the exponents k_phi the masks are drawn
   with, and later the phi head's output with grad for any microbatch's rows;
3. :func:`draw_masks` and :func:`masked_copies`: the K masked copies of each row, copy-major per
   microbatch;
4. ``Passes.masked_pass`` hands the features of each microbatch's masked copies to
   :func:`masked_pass_loss`: the per-row NELBO terms and the RLOO surrogate;
5. :func:`assemble_loss`: one :class:`LossOutput` from the microbatches, statistics from
   ``diagnostics.StepSums`` summed over data-parallel ranks; ``Passes.share`` gives it to every
   rank that computed no loss itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from operator import add
from typing import Callable, Protocol

import torch
from torch import Tensor

from kernels.velocity_loss import velocity_loss

from ..config import DiffusionConfig
from . import randomness
from .diagnostics import ExponentSums, StepSums
from .schedulers import Scheduler
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
    stats: dict[str, torch.Tensor]
    """Detached diagnostics (``diagnostics.StepSums.statistics``): exponent statistics, masked
    fraction, mean t."""

    def to(self, device: torch.device | str) -> LossOutput:
        """Every tensor moved to ``device`` (to send a result between processes)."""
        return LossOutput(loss=self.loss.to(device), nelbo=self.nelbo.to(device), l_main=self.l_main.to(device),
                          l_velocity=self.l_velocity.to(device), row_nelbo=self.row_nelbo.to(device),
                          tokens=self.tokens.to(device), stats={k: v.to(device) for k, v in self.stats.items()})


@dataclass(frozen=True)
class StepSpec:
    """Which NELBO estimate a call computes. Its t and masks are pure functions of (seed, step,
    stream, global row), so the same spec gives a row the same draws however the batch is split."""

    seed: int
    step: int
    rows: Tensor
    """Global index of each local row (B,)."""
    global_batch: int
    """Rows of the global batch: the stratified (antithetic) times are spread over all of them."""
    num_masks: int | None = None
    """Masked copies per row K; None: ``diffusion.masks_per_row`` resolved for the scheduler."""
    normalizer: float | Tensor | None = None
    """The loss and NELBO are divided by this; None: the local number of valid tokens. The
    distributed step passes the global count, so summed gradients equal the one-process ones."""
    time_stream: int = randomness.STREAM_TIME
    mask_stream: int = randomness.STREAM_MASK
    stratum_shift: int = 0
    """Global row i draws its time in stratum (i + stratum_shift) mod ``global_batch``; only the
    time draw uses it (masks stay keyed by the global row). Training uses 0."""

    @classmethod
    def evaluation(cls, *, seed: int, sample: int, rows: Tensor, global_batch: int) -> StepSpec:
        """The validation draw number ``sample``: one mask per row from the evaluation streams, not
        normalised (``row_nelbo`` and the sums are in nats), and the strata shifted by
        :func:`~lomdm_dist.diffusion.randomness.stratum_shift` so a row's time is uniform over draws."""
        return cls(seed=seed, step=sample, rows=rows, global_batch=global_batch, num_masks=1, normalizer=1.0,
                   time_stream=randomness.STREAM_EVAL_TIME, mask_stream=randomness.STREAM_EVAL_MASK,
                   stratum_shift=randomness.stratum_shift(seed, sample, global_batch))


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


def step_randomness(spec: StepSpec, cfg: DiffusionConfig, *, seq_len: int, num_masks: int,
                    device: torch.device | str) -> tuple[TimeDraw, Tensor]:
    """(times (B,) with their weights, uniforms (K, B, L) float64) for the global rows of ``spec``."""
    rows = spec.rows.to(device)
    u = randomness.stratified_uniforms(spec.seed, spec.step, rows, spec.global_batch, antithetic=cfg.antithetic,
                                       stream=spec.time_stream, shift=spec.stratum_shift)
    times = build_time_sampler(cfg).draw(u)
    uniforms = torch.stack([randomness.uniform(spec.seed, spec.step, spec.mask_stream + r, rows, seq_len)
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


def draw_exponents(scheduler: Scheduler, g_phi: Tensor, t: Tensor, valid: Tensor) -> Tensor:
    """k_phi (B, L) without grad from the phi head's output: the exponents the masks are drawn with."""
    with torch.no_grad():
        return scheduler.exponents(g_phi.detach(), t, valid).k


# --- where the features come from -----------------------------------------------------------------

@dataclass(frozen=True)
class CleanPass:
    """What pass 1 over the clean rows leaves for the rest of the step."""

    k: Tensor
    """(B, L) exponents k_phi the masks are drawn with, without grad, on every rank."""
    phi: Callable[[slice], Tensor] | None
    """Rows -> the phi head's output (rows, L) float32 *with* grad to the head (its input, the clean
    features, is detached). Equal to what ``k`` was computed from, because the head has no dropout.
    None where the heads do not live (pipeline stages other than the last)."""


MicrobatchLoss = Callable[[int, Tensor, Tensor], Tensor]
"""(microbatch index, features h (K*b, L, d), conditioning c (K*b, cond_dim)) -> the scalar to
back-propagate for that microbatch; given by the objective to ``Passes.masked_pass``."""


class Passes(Protocol):
    """How a layout runs the model passes of one step. ``diffusion_loss`` owns every formula and asks
    this object only for features, microbatch by microbatch; implementations:
    :class:`PlainPasses` and ``lomdm_dist.parallel.pipeline.PipelinePasses``."""

    token_loss: TokenLoss
    """Per-token loss from this layout's logits (full or vocab-parallel)."""
    reduce_sums: Callable[[Tensor], Tensor] | None
    """Sums the statistics' numerators and counts over data-parallel ranks (None: one process)."""
    backpropagates: bool
    """True when ``masked_pass`` back-propagates each microbatch's loss itself (a pipeline schedule):
    the returned loss is then detached."""

    def microbatches(self, rows: int) -> list[slice]:
        """The local rows (B of them), split as ``masked_pass`` will visit them."""

    def clean_pass(self, x: Tensor, sigma: Tensor, to_exponents: Callable[[Tensor], Tensor]) -> CleanPass:
        """Pass 1 over the clean rows ``x`` (B, L) with conditioning input ``sigma`` (B,): the backbone
        without grad, then the phi head; ``to_exponents`` maps its output (B, L) to the exponents."""

    def masked_pass(self, z: Tensor, sigma: Tensor, loss: MicrobatchLoss) -> None:
        """Features of the masked copies ``z`` (K*B, L, copy-major within each microbatch) with
        ``sigma`` (K*B,); calls ``loss`` once per microbatch where the output layer lives."""

    def share(self, out: LossOutput | None) -> LossOutput:
        """The step's result on every rank, from the ranks that computed it (``out`` None elsewhere)."""


class PlainPasses:
    """The passes on a model that holds every layer: one batch, one microbatch. Also the tensor /
    sequence / data parallel layouts, which change only the per-token loss and the sums."""

    backpropagates = False

    def __init__(self, model, *, token_loss: TokenLoss = velocity_loss,
                 reduce_sums: Callable[[Tensor], Tensor] | None = None) -> None:
        self.model = model
        self.token_loss = token_loss
        self.reduce_sums = reduce_sums

    def microbatches(self, rows: int) -> list[slice]:
        return [slice(0, rows)]

    def clean_pass(self, x: Tensor, sigma: Tensor, to_exponents: Callable[[Tensor], Tensor]) -> CleanPass:
        backbone = self.model.backbone
        c_clean = backbone.conditioning(x.shape[0], sigma)
        with torch.no_grad():             # no gradient to the backbone from the forward scheduler
            h_clean = backbone.features(x, c_clean)
        g_phi = self.model.phi(h_clean, c_clean).float()      # once, with grad; k from it detached
        return CleanPass(k=to_exponents(g_phi), phi=lambda rows: g_phi[rows])

    def masked_pass(self, z: Tensor, sigma: Tensor, loss: MicrobatchLoss) -> None:
        backbone = self.model.backbone
        c = backbone.conditioning(z.shape[0], sigma)
        loss(0, backbone.features(z, c), c)

    def share(self, out: LossOutput | None) -> LossOutput:
        return out


# --- the loss of a set of rows and its assembly -----------------------------------------------------

@dataclass
class PassLoss:
    """Loss terms of a set of rows (a whole local batch or one pipeline microbatch)."""

    surrogate: Tensor
    """(B,) surrogate per row (differentiable)."""
    F_main: Tensor
    """(K, B) detached sums of l_main per masked copy."""
    F_vel: Tensor
    """(K, B) detached sums of l_velocity per masked copy."""
    sums: StepSums
    """Detached sums and counts the step statistics are made of (added across microbatches)."""


def masked_pass_loss(model, scheduler: Scheduler, *, h: Tensor, c: Tensor, x: Tensor, valid: Tensor,
                     masks: Tensor, times: TimeDraw, g_phi: Tensor | None = None,
                     token_loss: TokenLoss = velocity_loss) -> PassLoss:
    """NELBO terms and RLOO surrogate of rows ``x`` (B, L) from the features ``h`` (K*B, L, d) of
    their masked copies (conditioning ``c`` (K*B, cond_dim)).

    Token losses are computed with the t-scaled velocities v = A t (k for lomdm, so finite at any
    t) and each row's sum is multiplied by ``times.row_weight`` = w(t) / t (see
    ``lomdm_dist.diffusion.time_sampling``); only masked, non-padding positions are scored.

    For the learned scheduler ``g_phi`` (B, L) is the phi head's output with grad on the clean rows:
    its exponents equal the ones the masks were drawn with, and it gets the RLOO gradient.
    """
    backbone = model.backbone
    K, B, L = masks.shape
    log_q = k_phi_sums = k_hat_sums = g_phi_total = None
    if scheduler.learned:
        if g_phi is None:
            raise ValueError("masked_pass_loss: the lomdm scheduler needs the phi head's output g_phi")
        sched = scheduler.exponents(g_phi, times.t, valid, masks=masks)
        scaled_velocity, log_q = sched.k, sched.log_q
        g_in = scheduler.normsig_input(g_phi.detach(), valid)
        k_phi_sums = ExponentSums.of(sched.k[valid], g_in[valid])
        g_phi_total = g_phi.detach()[valid].double().sum()
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
        k_hat_sums = ExponentSums.of(k_hat[valid_rep], scheduler.normsig_input(g_psi.detach(), every)[valid_rep])
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
    sums = StepSums(masked=(masks & valid).sum().double(), valid_copies=(valid.sum() * K).double(),
                    t_total=times.t.sum().double(), rows=torch.tensor(float(B), dtype=torch.float64, device=x.device),
                    k_phi=k_phi_sums, k_hat=k_hat_sums, g_phi_total=g_phi_total)
    return PassLoss(surrogate=surrogate, F_main=F_main.detach(), F_vel=F_vel.detach(), sums=sums)


def assemble_loss(parts: list[PassLoss], *, normalizer: Tensor | float, tokens: Tensor, detached: bool = False,
                  reduce_sums: Callable[[Tensor], Tensor] | None = None) -> LossOutput:
    """One ``LossOutput`` from the loss terms of consecutive row sets (microbatches, in row order).

    ``detached``: the per-microbatch losses were already back-propagated (a pipeline schedule), so
    the loss is their detached sum. ``reduce_sums`` sums the statistics' numerators and counts over
    data-parallel ranks, so ``stats`` describe the global batch.
    """
    F_main = torch.cat([p.F_main for p in parts], dim=1)
    F_vel = torch.cat([p.F_vel for p in parts], dim=1)
    F = F_main + F_vel
    loss = sum((p.surrogate.detach() if detached else p.surrogate).sum() for p in parts) / normalizer
    sums = reduce(add, [p.sums for p in parts])
    if reduce_sums is not None:
        sums = sums.reduced(reduce_sums)
    return LossOutput(loss=loss, nelbo=F.mean(0).sum() / normalizer, l_main=F_main.mean(0).sum() / normalizer,
                      l_velocity=F_vel.mean(0).sum() / normalizer, row_nelbo=F.double().mean(0), tokens=tokens,
                      stats=sums.statistics())


# --- the step ---------------------------------------------------------------------------------------

def _joined(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def diffusion_loss(model, scheduler: Scheduler, x: torch.Tensor, spec: StepSpec, *, cfg: DiffusionConfig,
                   valid: torch.Tensor | None = None, passes: Passes | None = None) -> LossOutput:
    """One NELBO estimate for the rows ``x`` (B, L) of the global batch, drawn as ``spec`` says.

    ``passes`` runs the model passes for a layout (default: :class:`PlainPasses` on ``model``, the
    full-vocabulary loss, no data-parallel sums). ``model`` is the module whose output layer and
    heads the loss applies (under pipeline parallelism: this rank's stages of it).
    """
    passes = PlainPasses(model) if passes is None else passes
    backbone = model.backbone
    B, L = x.shape
    if valid is None:
        valid = torch.ones_like(x, dtype=torch.bool)
    K = spec.num_masks or cfg.resolved_masks_per_row()
    tokens = valid.sum().to(torch.float32)
    normalizer = tokens.clamp(min=1.0) if spec.normalizer is None else spec.normalizer
    times, uniforms = step_randomness(spec, cfg, seq_len=L, num_masks=K, device=x.device)
    t = times.t.to(torch.float32)
    clean = None
    if scheduler.learned:
        # Pass 1: the forward scheduler's exponents from the clean rows (no gradient to the backbone).
        clean = passes.clean_pass(x, conditioning_sigma(backbone, torch.zeros_like(t)),
                                  lambda g_phi: draw_exponents(scheduler, g_phi, times.t, valid))
    masks = draw_masks(scheduler, times, uniforms, None if clean is None else clean.k)

    # Passes 2..K+1: the K masked copies of each microbatch's rows in one batch.
    chunks = passes.microbatches(B)
    z = _joined([masked_copies(x[s], masks[:, s], model.mask_token_id) for s in chunks])
    sigma = _joined([conditioning_sigma(backbone, t[s].repeat(K)) for s in chunks])
    parts: list[PassLoss | None] = [None] * len(chunks)

    def microbatch_loss(index: int, h: Tensor, c: Tensor) -> Tensor:
        rows = chunks[index]
        part = masked_pass_loss(model, scheduler, h=h, c=c, x=x[rows], valid=valid[rows], masks=masks[:, rows],
                                times=times[rows], g_phi=None if clean is None else clean.phi(rows),
                                token_loss=passes.token_loss)
        parts[index] = part
        return part.surrogate.sum() / normalizer

    passes.masked_pass(z, sigma, microbatch_loss)
    done = sum(p is not None for p in parts)
    if done and done < len(parts):
        raise RuntimeError(f"diffusion_loss: the masked pass visited {done} of {len(parts)} microbatches")
    out = None
    if done:
        out = assemble_loss(parts, normalizer=normalizer, tokens=tokens, detached=passes.backpropagates,
                            reduce_sums=passes.reduce_sums)
    return passes.share(out)
