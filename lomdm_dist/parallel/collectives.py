"""Autograd-aware collectives that DTensor does not express directly.

``all_reduce_replicated_loss``: the vocab-parallel loss sums per-slice statistics over the
tensor-parallel group; every rank then computes the *same* replicated loss, so the gradient of
each rank's slice is already complete locally and the backward must be the identity (Megatron's
``_VocabParallelCrossEntropy``). ``torch.distributed.nn.functional.all_reduce`` all-reduces in the
backward as well, which would multiply the gradient by the group size; hence this small Function.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _AllReduceSumIdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def all_reduce_replicated_loss(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum over ``group`` in the forward, identity in the backward (see the module docstring)."""
    return _AllReduceSumIdentityBackward.apply(tensor, group)


def all_reduce_max(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Element-wise maximum over ``group`` (not differentiable: a log-sum-exp shift)."""
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out
