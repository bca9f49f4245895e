"""Validation NELBO and perplexity, MDLM's ``ppl_eval`` protocol.

One pass over the split; for each row ``t_samples`` diffusion times (antithetic across the batch)
and one mask each; L_main and L_velocity both counted (the bound needs both); sums in float64;
perplexity = exp(NELBO per token). The draws come from the eval streams of the counter-based RNG,
so every evaluation of a run sees the same t and masks and its numbers are comparable over time.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch
from tqdm import tqdm

from ..config import DiffusionConfig
from ..diffusion import randomness
from ..diffusion.objective import diffusion_loss
from ..diffusion.schedulers import Scheduler


@torch.no_grad()
def validation_nelbo(model, scheduler: Scheduler, batches: Iterable[torch.Tensor], *, cfg: DiffusionConfig,
                     seed: int, device: torch.device | str = "cpu", pad_id: int | None = None, t_samples: int = 1,
                     autocast_dtype: torch.dtype | None = None, progress: bool = False,
                     first_row: int = 0) -> dict[str, float]:
    """Returns ``val_nelbo`` (nats per token), ``val_ppl``, ``val_tokens`` and the two parts."""
    was_training = model.training
    model.eval()
    total = {"nelbo": 0.0, "l_main": 0.0, "l_velocity": 0.0, "tokens": 0.0}
    row = first_row
    device = torch.device(device)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        for x in tqdm(batches, desc="eval", disable=not progress, leave=False):
            x = x.to(device)
            valid = (x != pad_id) if pad_id is not None else None
            rows = torch.arange(row, row + x.shape[0], device=device)
            for sample_index in range(t_samples):
                with autocast:
                    out = diffusion_loss(model, scheduler, x, cfg=cfg, seed=seed, step=sample_index, rows=rows,
                                         global_batch=x.shape[0], valid=valid, num_masks=1, normalizer=1.0,
                                         time_stream=randomness.STREAM_EVAL_TIME,
                                         mask_stream=randomness.STREAM_EVAL_MASK)
                total["nelbo"] += out.row_nelbo.sum().item() / t_samples
                total["l_main"] += out.l_main.double().item() / t_samples
                total["l_velocity"] += out.l_velocity.double().item() / t_samples
            total["tokens"] += out.tokens.item()
            row += x.shape[0]
    finally:
        model.train(was_training)
    tokens = max(total["tokens"], 1.0)
    nelbo = total["nelbo"] / tokens
    return {"val_nelbo": nelbo, "val_ppl": math.exp(min(nelbo, 700.0)), "val_tokens": total["tokens"],
            "val_l_main": total["l_main"] / tokens, "val_l_velocity": total["l_velocity"] / tokens}
