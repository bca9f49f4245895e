"""The vocab-parallel per-token loss: the tensor-parallel hook of the objective.

The objective itself (randomness, masks, the three passes, RLOO, statistics) is written once, in
``lomdm_dist.diffusion.objective.diffusion_loss``, which every layout runs; a layout supplies only
its passes (``PlainPasses``, or ``pipeline.PipelinePasses``), with this per-token loss and the sum
over data-parallel ranks. What tensor parallelism changes is only the per-token loss: the output layer hands
each rank its slice of the vocabulary's logits, and :func:`vocab_parallel_token_loss` combines
the slices' statistics without ever gathering the (N, V) logits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

from kernels.velocity_loss import (VocabPartials, combine_vocab_parallel, rescale_sumexp, velocity_loss,
                                   vocab_parallel_partials)

from ..diffusion.objective import TokenLoss
from .collectives import all_reduce_max, all_reduce_replicated_loss


@dataclass(frozen=True)
class VocabParallel:
    """This rank's slice of the output vocabulary and the group that holds the other slices."""

    group: dist.ProcessGroup
    vocab_start: int


def vocab_parallel_token_loss(logits: Tensor, targets: Tensor, A: Tensor, A_hat: Tensor, *, mask_token_id: int,
                              vocab_parallel: VocabParallel) -> tuple[Tensor, Tensor]:
    """Per-token (l_main, l_velocity) from this rank's vocabulary slice of the logits.

    The protocol of ``kernels.velocity_loss``: per-slice max, rescaled sum-exp and target logit,
    reduced over the group. Every rank ends with the same per-token losses.
    """
    part = vocab_parallel_partials(logits, targets, vocab_start=vocab_parallel.vocab_start,
                                   mask_token_id=mask_token_id)
    group = vocab_parallel.group
    global_max = all_reduce_max(part.local_max, group)
    sumexp = all_reduce_replicated_loss(rescale_sumexp(part.local_sumexp, part.local_max, global_max), group)
    target_logit = all_reduce_replicated_loss(part.local_target_logit, group)
    return combine_vocab_parallel(VocabPartials(global_max, sumexp, target_logit), A, A_hat)


def token_loss_for(vocab_parallel: VocabParallel | None) -> TokenLoss:
    """The per-token loss of a layout: the fused kernel on full logits, or the vocab-parallel one."""
    if vocab_parallel is None:
        return velocity_loss
    return functools.partial(vocab_parallel_token_loss, vocab_parallel=vocab_parallel)
