"""Building blocks of the MDLM DDiT: fp32 LayerNorm, adaLN modulation, noise-level embedding,
attention, MLP, the DiT block and the final (output) layer.

Module names are part of the contract with ``lomdm_dist/parallel/``: tensor parallelism shards
``attn.q_proj``/``k_proj``/``v_proj`` and ``mlp.fc1`` column-wise and ``attn.o_proj``/``mlp.fc2``
row-wise, so attention reshapes use ``-1`` for the head count (a shard holds ``n_heads / tp`` heads).
Every adaLN ``modulation`` Linear is zero-initialised (adaLN-Zero): a fresh block is the identity and
a fresh final layer outputs zero logits, i.e. the uniform distribution. Modules declare such layers
in a ``zero_init`` attribute; ``init.py`` initialises every parameter from (seed, name), which
``build_model`` applies (a module constructed on its own keeps PyTorch's default initialisation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rotary import apply_rotary, rotary_cos_sin


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm with a weight and no bias, computed in fp32 even under autocast (MDLM's choice).

    The result stays fp32 so the residual stream and the modulation that follows keep full
    precision; the next Linear casts to the autocast dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__(dim, eps=eps, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, weight, None, self.eps)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``."""
    return x * (1 + scale) + shift


def broadcast_condition(mod: Tensor, x: Tensor) -> Tensor:
    """Insert the position axis when the conditioning is per row and ``x`` is per position.

    ``mod`` is (B, k) for ``x`` of (B, L, d), or already has ``x``'s leading dims (a gathered subset
    of positions, (N, k) with x (N, d)).
    """
    if mod.dim() == x.dim() - 1:
        mod = mod.unsqueeze(-2)
    if mod.dim() != x.dim():
        raise ValueError(
            f"conditioning of shape {tuple(mod.shape)} does not match input of shape {tuple(x.shape)}: "
            "pass c as (B, cond_dim) for (B, L, d) inputs or with the same leading dims as the input")
    return mod


class NoiseLevelEmbedding(nn.Module):
    """Sinusoidal embedding of the noise level sigma followed by a 2-layer SiLU MLP (MDLM's
    ``TimestepEmbedder``); the caller applies the final SiLU."""

    def __init__(self, cond_dim: int, frequency_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        if frequency_dim % 2:
            raise ValueError(f"frequency_dim must be even, got {frequency_dim}")
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def sinusoid(self, sigma: Tensor) -> Tensor:
        """(B,) -> (B, frequency_dim): ``[cos(sigma * f), sin(sigma * f)]`` with geometric frequencies."""
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(self.max_period)
                          * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma.float()[:, None] * freqs[None]
        return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)

    def forward(self, sigma: Tensor) -> Tensor:
        return self.mlp(self.sinusoid(sigma))


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with rotary q/k and no biases.

    q, k, v are separate Linears (not one fused qkv) so tensor parallelism can shard each by heads.
    """

    def __init__(self, d_model: int, n_heads: int, rope_base: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.head_dim = d_model // n_heads
        if self.head_dim % 2:
            raise ValueError(f"head dimension d_model / n_heads = {self.head_dim} must be even for rotary")
        self.rope_base = rope_base
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        cos, sin = rotary_cos_sin(s, self.head_dim, self.rope_base, device=x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """``fc1`` -> GELU (tanh approximation) -> ``fc2``, both with bias (MDLM)."""

    def __init__(self, d_model: int, mlp_ratio: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """One DDiT block with adaLN-Zero conditioning.

    ``x + gate_a * dropout(attn(modulate(norm1(x))))``, then
    ``x + gate_m * dropout(mlp(modulate(norm2(x))))``; shift/scale/gate for both come from
    ``modulation(c)`` in the order (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m). The
    modulation starts at zero, so a fresh block is the identity.
    """

    zero_init = ("modulation",)

    def __init__(self, d_model: int, n_heads: int, cond_dim: int, mlp_ratio: int, dropout: float,
                 rope_base: float) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, rope_base)
        self.norm2 = FP32LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio)
        self.modulation = nn.Linear(cond_dim, 6 * d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        mod = broadcast_condition(self.modulation(c), x)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
        x = x + gate_a * self.dropout(self.attn(modulate(self.norm1(x), shift_a, scale_a)))
        x = x + gate_m * self.dropout(self.mlp(modulate(self.norm2(x), shift_m, scale_m)))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated final LayerNorm and the untied output projection to the vocabulary.

    Works on any leading shape, so the loss can call it on the gathered masked positions only.
    Modulation and projection start at zero: a fresh model outputs zero logits (uniform).
    """

    zero_init = ("modulation", "linear")

    def __init__(self, d_model: int, cond_dim: int, vocab_size: int) -> None:
        super().__init__()
        self.norm = FP32LayerNorm(d_model)
        self.modulation = nn.Linear(cond_dim, 2 * d_model)
        self.linear = nn.Linear(d_model, vocab_size)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift, scale = broadcast_condition(self.modulation(c), h).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(h), shift, scale))
