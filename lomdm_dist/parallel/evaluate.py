"""Validation NELBO in any layout, equal to the single-process ``eval.perplexity.validation_nelbo``.

Every rank receives the same *global* validation batches and keeps its data-parallel rows, so a
row's t and mask (functions of its global index) and the totals do not depend on the layout. Same
protocol as ``validation_nelbo``: one mask per t sample, L_main + L_velocity, float64 sums,
perplexity = exp(NELBO per token).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch

from ..config import DiffusionConfig
from ..diffusion import randomness
from ..diffusion.schedulers import Scheduler
from .mesh import local_rows, sum_over_dp
from .parallelize import ParallelModel
from .step import evaluation_loss


@torch.no_grad()
def distributed_validation_nelbo(pm: ParallelModel, scheduler: Scheduler, batches: Iterable[torch.Tensor], *,
                                 cfg: DiffusionConfig, seed: int, device: torch.device | str = "cpu",
                                 pad_id: int | None = None, t_samples: int = 1,
                                 autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """``val_nelbo`` (nats per token), ``val_ppl``, ``val_tokens`` and the two parts, on every rank."""
    was_training = pm.model.training
    pm.model.eval()
    device = torch.device(device)
    totals = torch.zeros(4, dtype=torch.float64, device=device)   # nelbo, l_main, l_velocity, tokens
    first = 0
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        for batch in batches:
            batch = batch.to(device)
            global_batch = batch.shape[0]
            rows = local_rows(pm.mesh, global_batch, device=device)
            x = batch[rows]
            valid = (x != pad_id) if pad_id is not None else torch.ones_like(x, dtype=torch.bool)
            for sample in range(t_samples):
                with autocast:
                    out = evaluation_loss(pm, scheduler, x, cfg=cfg, seed=seed, step=sample, rows=rows + first,
                                          global_batch=global_batch, valid=valid, num_masks=1, normalizer=1.0,
                                          time_stream=randomness.STREAM_EVAL_TIME,
                                          mask_stream=randomness.STREAM_EVAL_MASK)
                totals[0] += out.row_nelbo.sum() / t_samples
                totals[1] += out.l_main.double() / t_samples
                totals[2] += out.l_velocity.double() / t_samples
            totals[3] += valid.sum()
            first += global_batch
    finally:
        pm.model.train(was_training)
    totals = sum_over_dp(totals, pm.mesh)
    tokens = max(totals[3].item(), 1.0)
    nelbo = totals[0].item() / tokens
    return {"val_nelbo": nelbo, "val_ppl": math.exp(min(nelbo, 700.0)), "val_tokens": totals[3].item(),
            "val_l_main": totals[1].item() / tokens, "val_l_velocity": totals[2].item() / tokens}
