"""Ancestral sampling of masked diffusion models with position-dependent reverse velocity.

Reverse process (docs/method.md section 6.1): start all-mask at t = 1 and walk the uniform grid
``t_j = linspace(1, t_min, steps + 1)``. The default t_min = 0 ends the walk exactly at t = 0, where
every position still masked unmasks with probability 1 and is *sampled*; with t_min > 0 (MDLM's
1e-5) the share t_min^k_hat of positions is still masked at the end (56% at k_hat = 0.05, 10% at
0.2) and filled by the denoiser's argmax, which ``SampleResult.argmax_filled`` counts. At step j (t = t_j, s = t_{j+1}) every masked position i
becomes clean with probability

    P_i = (alpha_i(s) - alpha_i(t)) / (1 - alpha_i(t))        (= 1 - (s/t)^k_hat_i for lomdm)

and then takes a token drawn from the denoiser's categorical x_theta(z_t)_i (SUBS: the mask token
has probability zero). Clean positions are copied. For the learned scheduler the reverse exponents
k_hat come from the psi head on the current state, so positions the model is sure about go first.

Why the work is organised as it is:

* **Cache.** Without time conditioning the backbone features h, and hence logits and k_hat, are
  functions of z alone; while no token changes, the previous network output is still exact and no
  call is made (MDLM's ``ddpm_cache``). Calls then track distinct unmasking events, not steps.
* **Logits only where a token is drawn.** The cache keeps h, not the (B, L, V) logits: the output
  projection runs on the positions that unmask in this step (and, at the end, on those still
  masked). Each position is projected about once per run instead of once per call, and no
  B x L x V float64 tensor is ever built.
* **float64 categorical.** Float32 Gumbel-max truncates the tail of the distribution and lowers
  sample entropy (Zheng et al. 2024); probabilities are formed in float64 and drawn with
  ``torch.multinomial``.
* **Given positions.** ``given`` clamps tokens at chosen positions (a prefix, or the text around the
  spans of an infilling template): the walk starts from that partly clean state, so given tokens are
  copied like any clean token, never drawn and never counted as unmasked by a step (their order is
  ``GIVEN_ORDER``). The psi head still sees the whole row, given tokens included, and NormSig still
  averages over all positions, as for every clean position during ordinary sampling.
* **Nucleus sampling.** ``top_p < 1`` draws from the smallest set of most probable tokens whose mass
  reaches ``top_p`` (Holtzman et al. 2020), renormalised, in the same float64 probabilities;
  ``top_p = 1`` leaves the categorical, and the random stream, exactly as without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import DiffusionConfig
from .schedulers import Scheduler


@dataclass
class SampleResult:
    tokens: Tensor
    """(N, L) int64 sampled ids; the mask id only where a position was never filled (final_argmax off)."""
    order: Tensor
    """(N, L) int64 step (0..steps-1) at which each position was unmasked; ``steps`` for positions
    not unmasked by any step (filled by the final argmax, or left masked without it); ``GIVEN_ORDER``
    (-1) for given (clamped) positions."""
    model_calls: int
    """Backbone evaluations actually made, summed over batches (caching skips calls)."""
    argmax_filled: int = 0
    """Positions still masked after the last step and filled by the final argmax (0 when the grid
    ends at t = 0)."""
    given: Tensor | None = None
    """(N, L) bool, True at given (clamped) positions; None when nothing was given."""


GIVEN_ORDER = -1
"""``SampleResult.order`` of a given position: before every step, and never a step's unmasking."""


def time_grid(steps: int, t_min: float, device: torch.device | str | None = None) -> Tensor:
    """The uniform reverse grid ``linspace(1, t_min, steps + 1)`` in float64 (MDLM's ``_sample``)."""
    return torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64, device=device)


def subs_log_probs(logits: Tensor, mask_token_id: int) -> Tensor:
    """float64 log-probabilities of the SUBS denoiser: the mask logit is excluded (-inf)."""
    logits = logits.to(torch.float64, copy=True)
    logits[..., mask_token_id] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """``probs`` (N, V) restricted to each row's nucleus and renormalised: the most probable tokens,
    in decreasing order, up to and including the first at which their cumulative mass reaches
    ``top_p`` (the smallest such set; ties keep the lower id first).

    Written here rather than taken from ``transformers``' top-p warper: the sampler does not depend on
    transformers, and the filter must act on the float64 probabilities, not on float32 logits.
    """
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p * sorted_probs.sum(dim=-1, keepdim=True)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=-1, keepdim=True)


def draw_categorical(logits: Tensor, mask_token_id: int, generator: torch.Generator | None,
                     top_p: float = 1.0) -> Tensor:
    """One token per row of ``logits`` (N, V) from the SUBS categorical (its nucleus for ``top_p`` < 1),
    sampled in float64."""
    if logits.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=logits.device)
    probs = nucleus(subs_log_probs(logits, mask_token_id).exp(), top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def subs_argmax(logits: Tensor, mask_token_id: int) -> Tensor:
    """Most likely non-mask token per row (MDLM's final noise removal)."""
    logits = logits.clone()
    logits[..., mask_token_id] = float("-inf")
    return logits.argmax(dim=-1)


class _Denoiser:
    """One batch's view of the network: caches features and reverse exponents until z changes."""

    def __init__(self, model, scheduler: Scheduler, diffusion_cfg: DiffusionConfig, reverse_c2_zero: bool):
        self.model = model
        self.backbone = model.backbone
        self.scheduler = scheduler
        self.cfg = diffusion_cfg
        self.reverse_c2_zero = reverse_c2_zero
        self.time_conditioned = bool(self.backbone.time_conditioning)
        self.calls = 0
        self.h: Tensor | None = None
        self.c: Tensor | None = None
        self.k_hat: Tensor | None = None

    def invalidate(self) -> None:
        self.h = None

    def evaluate(self, z: Tensor, t: Tensor, *, with_exponents: bool = True) -> None:
        """Run the backbone on z at times t (B,) unless the cached output is still exact.

        ``with_exponents=False`` (the final argmax, where t may be 0) skips the psi head.
        """
        if self.h is not None and not self.time_conditioned:
            return
        batch = z.shape[0]
        sigma = t.to(torch.float32) if self.time_conditioned else None
        self.c = self.backbone.conditioning(batch, sigma)
        self.h = self.backbone.features(z, self.c)
        self.calls += 1
        self.k_hat = None
        if self.scheduler.learned and with_exponents:
            if self.reverse_c2_zero:
                self.k_hat = torch.full(z.shape, float(self.scheduler.c1), dtype=torch.float64, device=z.device)
            else:
                g = self.model.psi(self.h, self.c).float()
                valid = torch.ones_like(z, dtype=torch.bool)
                self.k_hat = self.scheduler.exponents(g, t, valid).k.to(torch.float64)

    def logits_at(self, positions: Tensor) -> Tensor:
        """Logits (N, V) at the (B, L) boolean selection ``positions`` from the cached features."""
        rows = positions.nonzero(as_tuple=True)[0]
        return self.backbone.output_logits(self.h[positions], self.c[rows])


def _check_arguments(model, scheduler: Scheduler, num: int, seq_len: int, steps: int, t_min: float,
                     batch_size: int | None, reverse_c2_zero: bool, top_p: float) -> None:
    for name, value in (("num", num), ("seq_len", seq_len), ("steps", steps)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"sample: {name} must be a positive integer, got {value!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
        raise ValueError(f"sample: batch_size must be a positive integer or None, got {batch_size!r}")
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"sample: t_min must be in [0, 1), got {t_min}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample: top_p must be in (0, 1], got {top_p}")
    if scheduler.learned and getattr(model, "psi", None) is None and not reverse_c2_zero:
        raise ValueError(f"sample: the {scheduler.name} scheduler needs the model's psi head, which is absent")
    if reverse_c2_zero and not scheduler.learned:
        raise ValueError(f"sample: reverse_c2_zero applies only to the learned (lomdm) scheduler, "
                         f"not to {scheduler.name!r}")


def _given_rows(given, num: int, seq_len: int, mask_id: int, device: torch.device) -> Tensor | None:
    """``given`` (L,) or (num, L) as (num, L) int64 on ``device``, checked: ids in [0, mask_id], the mask
    id marking the positions to generate."""
    if given is None:
        return None
    given = torch.as_tensor(given)
    if given.dtype.is_floating_point or given.dtype == torch.bool:
        raise ValueError(f"sample: given must hold integer token ids, got dtype {given.dtype}")
    if given.dim() == 1:
        given = given.expand(num, -1)
    if given.shape != (num, seq_len):
        raise ValueError(f"sample: given must have shape ({seq_len},) or ({num}, {seq_len}), got {tuple(given.shape)}")
    if bool(((given < 0) | (given > mask_id)).any()):
        raise ValueError(f"sample: given ids must lie in [0, {mask_id}] (the mask id {mask_id} marks positions "
                         f"to generate), got values from {int(given.min())} to {int(given.max())}")
    return given.to(device=device, dtype=torch.long).clone()


def _model_device(model) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _sample_batch(denoiser: _Denoiser, scheduler: Scheduler, grid: Tensor, batch: int, seq_len: int,
                  mask_id: int, final_argmax: bool, generator: torch.Generator, device: torch.device,
                  progress_bar, given: Tensor | None = None, top_p: float = 1.0) -> tuple[Tensor, Tensor, int]:
    """One batch of the reverse walk from ``given`` (B, L) (the all-mask state when None)."""
    steps = grid.numel() - 1
    z = given.clone() if given is not None else torch.full((batch, seq_len), mask_id, dtype=torch.long, device=device)
    order = torch.full((batch, seq_len), steps, dtype=torch.long, device=device)
    order[z != mask_id] = GIVEN_ORDER
    for j in range(steps):
        masked = z == mask_id
        if not bool(masked.any()):
            if progress_bar is not None:
                progress_bar.update(steps - j)
            break
        t = grid[j].expand(batch)
        s = grid[j + 1].expand(batch)
        denoiser.evaluate(z, t)
        k = denoiser.k_hat if scheduler.learned else None
        p_unmask = scheduler.unmask_prob(t, s, seq_len, k=k).to(torch.float64)
        u = torch.rand((batch, seq_len), generator=generator, dtype=torch.float64, device=device)
        unmask = masked & (u < p_unmask)
        if bool(unmask.any()):
            z[unmask] = draw_categorical(denoiser.logits_at(unmask), mask_id, generator, top_p)
            order[unmask] = j
            denoiser.invalidate()
        if progress_bar is not None:
            progress_bar.update(1)
    remaining = z == mask_id
    filled = 0
    if final_argmax and bool(remaining.any()):
        denoiser.evaluate(z, grid[-1].expand(batch), with_exponents=False)
        z[remaining] = subs_argmax(denoiser.logits_at(remaining), mask_id)
        filled = int(remaining.sum())
    return z, order, filled


@torch.no_grad()
def sample(model, scheduler: Scheduler, *, num: int, seq_len: int, steps: int, diffusion_cfg: DiffusionConfig,
           t_min: float = 0.0, final_argmax: bool = True, reverse_c2_zero: bool = False,
           seed: int = 0, batch_size: int | None = None, device=None, progress: bool = False,
           given: Tensor | None = None, top_p: float = 1.0) -> SampleResult:
    """Draw ``num`` sequences of length ``seq_len`` with ``steps`` reverse steps (see module docstring).

    ``given`` (L,) or (num, L) int64 clamps tokens: the mask id where a position is to be generated,
    a token id where it is given (a prefix, or an infilling template); given tokens are returned
    unchanged, with order ``GIVEN_ORDER``. ``top_p`` < 1 samples from the nucleus of each categorical.

    ``model`` exposes ``backbone`` (``conditioning`` / ``features`` / ``output_logits``,
    ``time_conditioning``), ``psi`` (learned scheduler only) and ``mask_token_id``. Randomness comes
    from one ``torch.Generator`` seeded with ``seed`` and consumed batch after batch, so a result is
    reproducible for a given ``batch_size`` (rows of different batch splits differ). The model runs
    in eval mode (no dropout) and its previous mode is restored afterwards. With time conditioning
    the network is called at every step with sigma = t, and the final argmax uses sigma = t_min.
    """
    _check_arguments(model, scheduler, num, seq_len, steps, t_min, batch_size, reverse_c2_zero, top_p)
    device = torch.device(device) if device is not None else _model_device(model)
    mask_id = int(model.mask_token_id)
    given = _given_rows(given, num, seq_len, mask_id, device)
    grid = time_grid(steps, t_min, device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    batch_size = batch_size or num
    n_batches = -(-num // batch_size)

    progress_bar = None
    if progress:
        from tqdm.auto import tqdm
        progress_bar = tqdm(total=n_batches * steps, desc="sampling", unit="step")
    was_training = model.training
    model.eval()
    tokens, orders, calls, filled = [], [], 0, 0
    try:
        for start in range(0, num, batch_size):
            batch = min(batch_size, num - start)
            denoiser = _Denoiser(model, scheduler, diffusion_cfg, reverse_c2_zero)
            z, order, batch_filled = _sample_batch(
                denoiser, scheduler, grid, batch, seq_len, mask_id, final_argmax, generator, device, progress_bar,
                given=given[start:start + batch] if given is not None else None, top_p=top_p)
            filled += batch_filled
            tokens.append(z)
            orders.append(order)
            calls += denoiser.calls
    finally:
        model.train(was_training)
        if progress_bar is not None:
            progress_bar.close()
    return SampleResult(tokens=torch.cat(tokens), order=torch.cat(orders), model_calls=calls, argmax_filled=filled,
                        given=given != mask_id if given is not None else None)
