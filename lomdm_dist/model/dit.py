"""The MDLM DDiT backbone: token embedding, a stack of adaLN DiT blocks, the final layer.

The forward pass is split into three public steps because the LoMDM objective needs them apart:
``conditioning`` (the adaLN vector), ``features`` (hidden states that also feed the phi/psi
scheduler heads) and ``output_logits`` (called by the loss on the masked positions only, which
saves most of the vocabulary projection). Names ``embed``, ``blocks`` (an ``nn.ModuleList`` that
pipeline parallelism splits), ``sigma_map`` and ``final`` are part of the contract with
``lomdm_dist/parallel/``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import DiTBlock, FinalLayer, NoiseLevelEmbedding


class DiT(nn.Module):
    """Bidirectional diffusion transformer with rotary attention and adaLN-Zero conditioning.

    Initial values come from ``model/init.py`` (embedding: MDLM's ``kaiming_uniform_(a=sqrt(5))``,
    uniform in +-1/sqrt(d_model); Linears: PyTorch's default bounds; adaLN modulations and the
    output projection: zero), which ``build_model`` applies.
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, cond_dim: int,
                 mlp_ratio: int = 4, dropout: float = 0.1, time_conditioning: bool = False,
                 rope_base: float = 10000.0) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.cond_dim = cond_dim
        self.time_conditioning = time_conditioning
        self.embed = nn.Embedding(vocab_size, d_model)
        self.sigma_map = NoiseLevelEmbedding(cond_dim)
        self.blocks = nn.ModuleList(
            DiTBlock(d_model, n_heads, cond_dim, mlp_ratio, dropout, rope_base) for _ in range(n_layers))
        self.final = FinalLayer(d_model, cond_dim, vocab_size)

    def conditioning(self, batch_size: int, sigma: Tensor | None = None) -> Tensor:
        """adaLN conditioning vector ``SiLU(sigma_map(sigma))`` of shape (batch_size, cond_dim).

        Without time conditioning sigma is taken as zero, whatever is passed (MDLM zeroes it too),
        so the result is one learned constant vector repeated per row. With time conditioning,
        ``sigma`` of shape (batch_size,) is required.
        """
        device = self.embed.weight.device
        if self.time_conditioning:
            if sigma is None:
                raise ValueError("model.time_conditioning is on: conditioning() needs sigma of shape (batch_size,)")
            if sigma.shape != (batch_size,):
                raise ValueError(f"sigma must have shape ({batch_size},), got {tuple(sigma.shape)}")
            sigma = sigma.to(device=device, dtype=torch.float32)
        else:
            sigma = torch.zeros(batch_size, device=device, dtype=torch.float32)
        return F.silu(self.sigma_map(sigma))

    def features(self, tokens: Tensor, c: Tensor) -> Tensor:
        """Hidden states (B, L, d_model) after the last block, before the final layer.

        Token ids are not range-checked here (that would cost a device sync per step); the embedding
        raises on ids outside [0, vocab_size).
        """
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor of shape (B, L), got {tokens.dtype} "
                             f"of shape {tuple(tokens.shape)}")
        if c.shape != (tokens.shape[0], self.cond_dim):
            raise ValueError(f"c must have shape ({tokens.shape[0]}, {self.cond_dim}), got {tuple(c.shape)}")
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h, c)
        return h

    def output_logits(self, h: Tensor, c: Tensor) -> Tensor:
        """Logits (..., vocab_size) from hidden states (..., d_model).

        ``c`` is (B, cond_dim) for ``h`` of (B, L, d_model), or has ``h``'s leading dims, e.g. the
        gathered masked positions ``h[mask]`` with ``c[:, None].expand(B, L, -1)[mask]``.
        """
        return self.final(h, c)

    def forward(self, tokens: Tensor, sigma: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(logits (B, L, vocab_size), h (B, L, d_model))``."""
        c = self.conditioning(tokens.shape[0], sigma)
        h = self.features(tokens, c)
        return self.output_logits(h, c), h
