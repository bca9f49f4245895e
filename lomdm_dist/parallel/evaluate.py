"""Validation NELBO in any layout, equal to the single-process ``eval.perplexity.validation_nelbo``.

Every rank receives the same *global* validation batches and keeps its data-parallel rows, so a
row's t and mask (functions of its index in the split) and the totals do not depend on the layout.
The protocol and the loop are ``validation_nelbo``'s own; this module supplies the layout: the
step (``evaluation_loss``, pipeline-aware), the rows of this rank and the sum over data-parallel
ranks.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..config import DiffusionConfig
from ..eval.perplexity import BatchSplit, validation_nelbo
from ..diffusion.schedulers import Scheduler
from .mesh import dp_size, local_rows, sum_over_dp
from .parallelize import ParallelModel
from .step import evaluation_loss


def layout_split(pm: ParallelModel) -> BatchSplit:
    """This rank's share of a global batch: its data-parallel rows, padded so that every rank's
    share divides into the pipeline's microbatches."""
    micro = pm.parallel.microbatches if pm.pipeline is not None else 1
    return BatchSplit(rows=lambda n: local_rows(pm.mesh, n), multiple=dp_size(pm.mesh) * micro,
                      reduce=lambda totals: sum_over_dp(totals, pm.mesh))


def distributed_validation_nelbo(pm: ParallelModel, scheduler: Scheduler, batches: Iterable[torch.Tensor], *,
                                 cfg: DiffusionConfig, seed: int, device: torch.device | str = "cpu",
                                 pad_id: int | None = None, t_samples: int = 1,
                                 autocast_dtype: torch.dtype | None = None,
                                 progress: bool = False) -> dict[str, float]:
    """``val_nelbo`` (nats per token), ``val_ppl``, ``val_tokens`` and the two parts, on every rank."""
    return validation_nelbo(pm, scheduler, batches, cfg=cfg, seed=seed, device=device, pad_id=pad_id,
                            t_samples=t_samples, autocast_dtype=autocast_dtype, progress=progress,
                            loss_fn=evaluation_loss, split=layout_split(pm))
