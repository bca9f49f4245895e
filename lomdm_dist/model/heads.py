"""The LoMDM scheduler heads g_phi (forward order, on clean x) and g_psi (reverse order, on z_t).

Each head is one extra DiT block of backbone width followed by an MLP read-out giving one scalar
per position. The head reads the backbone's features and conditioning *detached*: the scheduler is
trained only through its own terms of the objective, the backbone only through the denoising loss.
The last Linear is zero-initialised, so every exponent starts at ``c1`` (the polynomial schedule),
and has no bias: NormSig ignores a common shift of g (exactly, in its centred form), so a bias could
only collect rounding noise, which Adam's normalised steps would turn into a random walk.

The head's block has no dropout: the phi head may be applied twice to the same features (once
without grad to draw the masks, once with grad for the RLOO surrogate, e.g. under pipeline
parallelism) and both applications must give the same exponents.
"""

from __future__ import annotations

from torch import Tensor, nn

from .layers import DiTBlock, FP32LayerNorm


class SchedulerHead(nn.Module):
    """``g = out(GELU(proj(norm(block(h.detach(), c.detach())))))`` of shape (B, L), fp32.

    The block starts as the identity (as in the backbone), ``out`` at zero (see ``model/init.py``).
    """

    zero_init = ("out",)

    def __init__(self, d_model: int, n_heads: int, cond_dim: int, mlp_ratio: int, rope_base: float,
                 hidden: int) -> None:
        super().__init__()
        self.block = DiTBlock(d_model, n_heads, cond_dim, mlp_ratio, dropout=0.0, rope_base=rope_base)
        self.norm = FP32LayerNorm(d_model)
        self.proj = nn.Linear(d_model, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.out = nn.Linear(hidden, 1, bias=False)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        if h.dim() != 3 or c.dim() != 2 or c.shape[0] != h.shape[0]:
            raise ValueError(f"SchedulerHead expects h (B, L, d_model) and c (B, cond_dim), got "
                             f"{tuple(h.shape)} and {tuple(c.shape)}")
        x = self.block(h.detach(), c.detach())
        return self.out(self.act(self.proj(self.norm(x)))).squeeze(-1).float()
