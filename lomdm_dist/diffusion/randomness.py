"""Counter-based randomness: every draw of a step is a pure function of its coordinates.

Why not ``torch.Generator``: the distributed engine splits a global batch over data-parallel ranks
and pipeline microbatches in different ways; a row must get the same diffusion time and the same
masks whatever the split. Hashing ``(seed, step, stream, global row index, position)`` gives exactly
that, is vectorised on any device, and needs no generator state in checkpoints.

The mixer is Wellons' ``lowbias32`` (a 32-bit integer finaliser with low avalanche bias), computed in
int64 and masked to 32 bits after each multiply, so only the low 32 bits of each product are used;
those are exact even where the 64-bit product wraps. Two independent 32-bit hashes make one
53-bit float64 uniform.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9

# Streams: independent families of draws within one step.
STREAM_TIME = 1
STREAM_MASK = 16  # mask r uses STREAM_MASK + r
STREAM_EVAL_TIME = 101
STREAM_EVAL_SHIFT = 102  # the common stratum shift of an evaluation time draw
STREAM_EVAL_MASK = 116


def mix32_int(x: int) -> int:
    """Python-int version of the mixer (used for scalar keys)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    x ^= x >> 16
    return x


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Tensor version of :func:`mix32_int` on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


def scalar_key(*parts: int) -> int:
    """Fold integers (any sign or size) into one 32-bit key."""
    key = _GOLDEN
    for part in parts:
        part = int(part)
        for word in (part & _MASK32, (part >> 32) & _MASK32, 1 if part < 0 else 0):
            key = mix32_int(key ^ mix32_int(word + _GOLDEN))
    return key


def uniform(seed: int, step: int, stream: int, rows: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Uniforms in [0, 1) of shape (len(rows), num_positions), float64.

    ``rows`` are global row indices (int64); entry (b, i) depends only on
    (seed, step, stream, rows[b], i).
    """
    key = scalar_key(seed, step, stream)
    rows = rows.to(torch.int64).reshape(-1, 1)
    pos = torch.arange(num_positions, device=rows.device, dtype=torch.int64).reshape(1, -1)
    h = mix32(key ^ mix32((rows & _MASK32) ^ _GOLDEN))
    h = mix32(h ^ mix32((pos + 0x632BE5AB) & _MASK32))
    hi = mix32(h ^ 0x5BD1E995) >> 6           # 26 bits
    lo = mix32(h ^ 0x27D4EB2F) >> 5           # 27 bits
    return (hi * (1 << 27) + lo).to(torch.float64) * (1.0 / (1 << 53))


def stratified_uniforms(seed: int, step: int, rows: torch.Tensor, global_batch: int, *, antithetic: bool = True,
                        stream: int = STREAM_TIME, shift: int = 0) -> torch.Tensor:
    """One uniform in [0, 1) per row, float64, shape (len(rows),).

    Antithetic (stratified) sampling as MDLM: global row i draws u_i in [s/n, (s+1)/n) with
    n = ``global_batch`` and stratum s = (i + ``shift``) mod n, so the global batch covers [0, 1)
    evenly whatever the split. ``shift`` moves every row to another stratum at once (see
    :func:`stratum_shift`); the training step uses 0. The time sampler
    (``lomdm_dist.diffusion.time_sampling``) maps these to times.
    """
    u = uniform(seed, step, stream, rows, 1)[:, 0]
    if antithetic:
        u = torch.remainder(u / global_batch + (rows + shift).to(torch.float64) / global_batch, 1.0)
    return u


def stratum_shift(seed: int, draw: int, global_batch: int, *, stream: int = STREAM_EVAL_SHIFT) -> int:
    """The common cyclic stratum shift of evaluation draw ``draw``: floor(n U) with U uniform, hashed
    from (seed, draw); 0 for draw 0.

    Why: with a fixed stratum per row, the K time draws of one row all fall in the same slice
    [i/n, (i+1)/n), so averaging them never makes the row's own estimate unbiased. Shifting every
    row by the same uniformly drawn amount keeps each draw stratified over the batch and makes the
    stratum of a given row uniform over draws k >= 1. Draw 0 keeps shift 0, so a one-draw
    evaluation (the numbers the trainer logs) is unchanged.
    """
    if draw == 0:
        return 0
    u = uniform(seed, draw, stream, torch.zeros(1, dtype=torch.int64), 1).item()
    return min(int(u * global_batch), global_batch - 1)


def diffusion_times(seed: int, step: int, rows: torch.Tensor, global_batch: int, *, t_eps: float,
                    antithetic: bool = True, stream: int = STREAM_TIME) -> torch.Tensor:
    """Per-row times of the truncated sampler, uniform in [t_eps, 1] (float64, (len(rows),))."""
    u = stratified_uniforms(seed, step, rows, global_batch, antithetic=antithetic, stream=stream)
    return (1.0 - t_eps) * u + t_eps
