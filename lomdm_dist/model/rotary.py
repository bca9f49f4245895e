"""Rotary position embeddings (RoPE) for the attention queries and keys.

The DiT has no absolute position embedding: positions enter only through the rotation of q and k,
so attention scores depend on relative offsets alone. The layout is the "rotate half" one used by
MDLM (via flash-attn) and GPT-NeoX: channel ``j`` is paired with channel ``j + head_dim / 2``, and
the pair is rotated as the complex number ``x_j + i x_{j + head_dim/2}`` times ``exp(i pos theta_j)``.

Why hand-written: the two functions are a dozen lines; the libraries that ship RoPE (flash-attn,
torchtune, transformers' model files) are either GPU-only or heavy imports for a model that must
stay plain PyTorch. The tables are recomputed on every call instead of being cached in buffers so
that a model built on the meta device needs no buffer re-initialisation, and so each block is
self-contained (pipeline stages can hold any slice of the blocks); the cost is O(L * head_dim).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_cos_sin(seq_len: int, head_dim: int, base: float, device: torch.device | str | None = None
                   ) -> tuple[Tensor, Tensor]:
    """Cosine and sine tables, each (seq_len, head_dim // 2) in fp32.

    ``theta_j = base ** (-2 j / head_dim)`` for ``j < head_dim / 2``; row ``p`` holds ``p * theta``.
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` of shape (B, L, H, head_dim) by the per-position angles; returns x's dtype.

    ``cos``/``sin`` are (L, head_dim // 2). The rotation is done in fp32 so bf16 inputs lose no
    precision in the angle arithmetic.
    """
    half = x.shape[-1] // 2
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)
