"""Pieces of the tests' rounding tolerances that are more than one expression.

Tolerances are derived from the arithmetic a test checks, never fitted to one machine: the order
in which float32 terms are summed depends on the thread count, the batch shape and the layout, so
two correct computations differ by the rounding of their sums (n terms: n * 2^-24 relative worst
case, sqrt(n) * 2^-24 typical).
"""

from __future__ import annotations

import torch


def grad_scale(grads: dict[str, torch.Tensor], name: str) -> float:
    """The size against which the rounding of gradient ``name`` is measured: its largest entry, or,
    for a bias, its weight's largest entry if that is larger.

    A gradient entry is a sum of back-propagated contributions, so its rounding error is relative to
    their size, not to the sum: where they cancel (the output bias of a head whose NormSig is
    centred has a gradient of exactly zero) the entry is pure rounding.  A bias sums the same
    contributions as its weight's gradient (times the layer input, O(1) after the norm), which
    therefore gives their size.
    """
    scale = grads[name].abs().max().item()
    if name.endswith(".bias"):
        weight = name[: -len("bias")] + "weight"
        if weight in grads:
            scale = max(scale, grads[weight].abs().max().item())
    return scale
