"""Shared fakes and independent references for the tests of the diffusion objective.

The toy model has the same surface as ``lomdm_dist.model.LoMDM`` (``backbone.conditioning /
features / output_logits``, ``backbone.time_conditioning``, ``phi``, ``psi``, ``mask_token_id``) but
is small enough to enumerate every mask of a short row, and its denoiser can be made exactly uniform.
The closed forms of the fixed schedulers are written here again, independently of
``lomdm_dist.diffusion.schedulers``, so that expected losses can be derived by hand.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn


class ToyBackbone(nn.Module):
    """A denoiser whose prediction at each position depends on every token of the row.

    ``features``: embedding plus a learned position-mixing matrix, through tanh (so the prediction
    for position i changes when any other position is masked). ``output_logits``: a Linear plus a
    term from the conditioning vector, so a wrong row-to-token gathering of ``c`` changes the loss.
    With ``uniform=True`` the logits are zero: the SUBS distribution is uniform over the real tokens.
    """

    def __init__(self, vocab_size: int, max_len: int, d_model: int = 8, cond_dim: int = 4, *,
                 uniform: bool = False, time_conditioning: bool = False, scale: float = 1.0,
                 seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.cond_dim = cond_dim
        self.uniform = uniform
        self.time_conditioning = time_conditioning
        self.embed = nn.Parameter(torch.randn(vocab_size, d_model, generator=gen))
        self.pos = nn.Parameter(torch.randn(max_len, d_model, generator=gen))
        self.mix = nn.Parameter(torch.randn(max_len, max_len, generator=gen) / math.sqrt(max_len))
        self.cond_time = nn.Parameter(torch.randn(cond_dim, generator=gen) * 3.0)
        self.cond_bias = nn.Parameter(torch.randn(cond_dim, generator=gen))
        self.cond_in = nn.Parameter(torch.randn(cond_dim, d_model, generator=gen) * 0.3)
        self.out_weight = nn.Parameter(torch.randn(vocab_size, d_model, generator=gen) * scale)
        self.out_cond = nn.Parameter(torch.randn(vocab_size, cond_dim, generator=gen) * 0.5 * scale)

    def conditioning(self, batch_size: int, sigma: Tensor | None = None) -> Tensor:
        if self.time_conditioning:
            if sigma is None or sigma.shape != (batch_size,):
                raise ValueError("time-conditioned toy backbone needs sigma of shape (batch_size,)")
            return torch.tanh(sigma.float()[:, None] * self.cond_time + self.cond_bias)
        return torch.tanh(self.cond_bias).expand(batch_size, -1)

    def features(self, tokens: Tensor, c: Tensor) -> Tensor:
        length = tokens.shape[1]
        e = self.embed[tokens] + self.pos[:length]
        mixed = torch.einsum("ij,bjd->bid", self.mix[:length, :length], e)
        return torch.tanh(e + mixed + (c @ self.cond_in)[:, None, :])

    def output_logits(self, h: Tensor, c: Tensor) -> Tensor:
        if self.uniform:
            return h.new_zeros(*h.shape[:-1], self.vocab_size)
        if c.dim() == h.dim() - 1:
            c = c.unsqueeze(-2).expand(*h.shape[:-1], c.shape[-1])
        return h @ self.out_weight.T + c @ self.out_cond.T


class ToyHead(nn.Module):
    """Scheduler head g(h) on detached features: tanh(h W1) w2 + b (one scalar per position)."""

    def __init__(self, d_model: int, hidden: int = 6, *, scale: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(d_model, hidden, generator=gen))
        self.w2 = nn.Parameter(torch.randn(hidden, generator=gen) * scale)
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        return torch.tanh(h.detach() @ self.w1) @ self.w2 + self.b


class ToyModel(nn.Module):
    """Container with the attributes of ``LoMDM`` that the objective reads."""

    def __init__(self, backbone: ToyBackbone, phi: ToyHead | None = None, psi: ToyHead | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.phi = phi
        self.psi = psi
        self.mask_token_id = backbone.vocab_size - 1
        self.vocab_size = backbone.vocab_size


def toy_model(vocab_size: int, max_len: int, *, learned: bool = False, uniform: bool = False,
              time_conditioning: bool = False, seed: int = 0) -> ToyModel:
    backbone = ToyBackbone(vocab_size, max_len, uniform=uniform, time_conditioning=time_conditioning, seed=seed)
    if not learned:
        return ToyModel(backbone)
    d = backbone.embed.shape[1]
    return ToyModel(backbone, ToyHead(d, scale=2.0, seed=seed + 1), ToyHead(d, scale=2.0, seed=seed + 2))


def randomise_zero_init(model: nn.Module, seed: int = 1, std: float = 0.5) -> None:
    """Give every all-zero parameter (adaLN modulations, output projection, head read-out) random
    values, so that a freshly built model is not the uniform denoiser with constant exponents."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() > 1 and not bool(param.any()):
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def one_torch_thread() -> Iterator[None]:
    """Body of a module-scoped fixture: run on one intra-op thread, then restore the setting.

    These tests push thousands of tiny tensors; on a loaded 2-core machine the thread pool's
    hand-offs cost several times the arithmetic (measured: 10 ms instead of 1.3 ms per loss call).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- independent references ------------------------------------------------------------------

def all_masks(length: int) -> Tensor:
    """Every mask pattern of a row, (2**length, length) bool, True = masked."""
    return torch.tensor(list(itertools.product([False, True], repeat=length)), dtype=torch.bool)


def subs_log_probs_full(model, z: Tensor, sigma: Tensor | None = None) -> Tensor:
    """MDLM's SUBS parameterisation on every position of z (B, L), float64 (B, L, V).

    Mask logit -inf, log-softmax; positions that are not masked are copied (log-prob 0 on their
    token, -inf elsewhere). Runs the backbone on the full rows, not on a gathered subset.
    """
    backbone = model.backbone
    c = backbone.conditioning(z.shape[0], sigma)
    logits = backbone.output_logits(backbone.features(z, c), c).double()
    logits[..., model.mask_token_id] = float("-inf")
    log_p = torch.log_softmax(logits, dim=-1)
    unmasked = z != model.mask_token_id
    copied = torch.full_like(log_p, float("-inf")).scatter(-1, z.unsqueeze(-1), 0.0)
    return torch.where(unmasked.unsqueeze(-1), copied, log_p)


def token_nll(model, z: Tensor, x: Tensor, sigma: Tensor | None = None) -> Tensor:
    """-log x_theta(z)_i[x_i] for every position (B, L), float64 (0 where z is clean)."""
    return -subs_log_probs_full(model, z, sigma).gather(-1, x.unsqueeze(-1)).squeeze(-1)


def window_masked_prob(t: np.ndarray | float, seq_len: int, block_size: int, eps: float) -> np.ndarray:
    """1 - alpha of the eps-regularised block scheduler, (..., L) for t (...,): block b (0-based) is
    noised linearly during [1 - (b+1)/nb, 1 - b/nb] and leaks eps * t everywhere."""
    t = np.asarray(t, dtype=np.float64)[..., None]
    n_blocks = seq_len // block_size
    block = np.arange(seq_len) // block_size
    start = 1.0 - (block + 1) / n_blocks
    progress = np.clip((t - start) * n_blocks, 0.0, 1.0)
    return (1.0 - eps) * progress + eps * t


def window_masked_rate(t: np.ndarray | float, seq_len: int, block_size: int, eps: float) -> np.ndarray:
    """d/dt of :func:`window_masked_prob` (= -alpha'), (..., L)."""
    t = np.asarray(t, dtype=np.float64)[..., None]
    n_blocks = seq_len // block_size
    block = np.arange(seq_len) // block_size
    start = 1.0 - (block + 1) / n_blocks
    inside = (t > start) & (t < start + 1.0 / n_blocks)
    return np.where(inside, (1.0 - eps) * n_blocks + eps, eps)


def gauss_legendre(a: float, b: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights on [a, b]; exact for polynomials of degree <= 2n - 1."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return 0.5 * (b - a) * nodes + 0.5 * (b + a), 0.5 * (b - a) * weights


def piecewise_nodes(breaks: list[float], lo: float, hi: float, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes on each piece of [lo, hi] cut at ``breaks`` (kinks of the integrand)."""
    cuts = sorted({lo, hi, *[b for b in breaks if lo < b < hi]})
    parts = [gauss_legendre(a, b, n) for a, b in zip(cuts[:-1], cuts[1:])]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def batch_mean_and_se(per_step: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean of independent per-step estimates and its standard error."""
    values = np.asarray(per_step, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))
