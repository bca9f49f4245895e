"""Validation NELBO and perplexity, MDLM's ``ppl_eval`` protocol, for one process or any layout.

One pass over the split; for each row ``t_samples`` diffusion times (antithetic across the batch,
the strata shifted from draw to draw, drawn by the configured time sampling: the whole interval for
lomdm) and one mask each; L_main and L_velocity both counted (the bound needs both); sums in float64;
perplexity = exp(NELBO per token). The draws come from the eval streams of the counter-based RNG,
keyed by each row's index in the split, so every evaluation of a run sees the same t and masks,
its numbers are comparable over time, and they do not depend on how the rows are spread over
processes.

The loop is written once. A distributed evaluation (``lomdm_dist.parallel.evaluate``) passes the
same *global* batches on every rank and a :class:`BatchSplit` that picks the rank's rows and sums
the totals over data-parallel ranks, and a ``loss_fn`` that runs its layout's step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from data_pipeline.reader import valid_mask

from ..config import DiffusionConfig
from ..diffusion.objective import StepSpec, diffusion_loss
from ..diffusion.schedulers import Scheduler


@dataclass(frozen=True)
class BatchSplit:
    """How a global validation batch is spread over processes."""

    rows: Callable[[int], torch.Tensor]
    """Padded global batch size -> this rank's row indices into it."""
    multiple: int
    """Global batches are padded (with invalid rows) to a multiple of this (data-parallel size x
    pipeline microbatches), so a ragged last batch splits evenly."""
    reduce: Callable[[torch.Tensor], torch.Tensor]
    """Sums a tensor of totals over the ranks that hold different rows."""


ONE_PROCESS = BatchSplit(rows=lambda n: torch.arange(n), multiple=1, reduce=lambda totals: totals)


def _padded(x: torch.Tensor, valid: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = -x.shape[0] % multiple
    if not extra:
        return x, valid
    return (torch.cat([x, x.new_zeros(extra, x.shape[1])]),
            torch.cat([valid, valid.new_zeros(extra, valid.shape[1])]))


def nelbo_draw(loss_fn: Callable, model, scheduler: Scheduler, x: torch.Tensor, *, cfg: DiffusionConfig, seed: int,
               sample_index: int, rows: torch.Tensor, global_batch: int, valid: torch.Tensor):
    """Time sample ``sample_index`` of every row of ``x``: the only place the evaluation calls the loss.

    ``StepSpec.evaluation``: one mask per time (no RLOO baseline is needed without gradients), sums
    per row (no normalisation), the eval streams of the counter-based RNG, and the sample index as
    the step. Every draw is stratified over the batch (one time per stratum); from draw 1 on, the
    strata are cyclically shifted by a common uniformly drawn amount, so a given row's time is
    uniform over the whole interval across draws (draw 0 keeps its fixed stratum, so one-draw
    numbers match the trainer's; the batch total is unbiased for every draw). The masks stay keyed
    by the global row.
    """
    spec = StepSpec.evaluation(seed=seed, sample=sample_index, rows=rows, global_batch=global_batch)
    return loss_fn(model, scheduler, x, spec, cfg=cfg, valid=valid)


@torch.no_grad()
def validation_nelbo(model, scheduler: Scheduler, batches: Iterable[torch.Tensor], *, cfg: DiffusionConfig,
                     seed: int, device: torch.device | str = "cpu", pad_id: int | None = None, t_samples: int = 1,
                     autocast_dtype: torch.dtype | None = None, progress: bool = False,
                     first_row: int = 0, loss_fn: Callable = diffusion_loss,
                     split: BatchSplit = ONE_PROCESS) -> dict[str, float]:
    """Returns ``val_nelbo`` (nats per token), ``val_ppl``, ``val_tokens`` and the two parts.

    ``loss_fn`` has ``diffusion_loss``'s signature and is called with ``model`` (a plain model, or a
    ``ParallelModel`` with ``lomdm_dist.parallel.evaluation_loss``); ``batches`` are global batches.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    # nelbo, l_main, l_velocity, tokens, and for the standard error: sum F_b^2, sum F_b n_b, sum n_b^2
    totals = torch.zeros(7, dtype=torch.float64, device=device)
    first = first_row
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        for batch in tqdm(batches, desc="eval", disable=not progress, leave=False):
            batch = batch.to(device)
            size = batch.shape[0]
            valid = valid_mask(batch, pad_id)
            batch, valid = _padded(batch, valid, split.multiple)
            rows = split.rows(batch.shape[0]).to(device)
            x, valid = batch[rows], valid[rows]
            row_nelbo = torch.zeros(x.shape[0], dtype=torch.float64, device=device)
            for sample_index in range(t_samples):
                with autocast:
                    out = nelbo_draw(loss_fn, model, scheduler, x, cfg=cfg, seed=seed, sample_index=sample_index,
                                     rows=rows + first, global_batch=size, valid=valid)
                row_nelbo += out.row_nelbo.to(device) / t_samples
                totals[1] += out.l_main.double() / t_samples
                totals[2] += out.l_velocity.double() / t_samples
            row_tokens = valid.sum(1).double()
            totals[0] += row_nelbo.sum()
            totals[3] += row_tokens.sum()
            totals[4] += (row_nelbo ** 2).sum()
            totals[5] += (row_nelbo * row_tokens).sum()
            totals[6] += (row_tokens ** 2).sum()
            first += size
    finally:
        model.train(was_training)
    totals = split.reduce(totals)
    tokens = max(totals[3].item(), 1.0)
    nelbo = totals[0].item() / tokens
    return {"val_nelbo": nelbo, "val_nelbo_se": ratio_standard_error(totals[4:7].tolist(), nelbo, tokens),
            "val_ppl": math.exp(min(nelbo, 700.0)), "val_tokens": totals[3].item(),
            "val_l_main": totals[1].item() / tokens, "val_l_velocity": totals[2].item() / tokens}


def ratio_standard_error(moments: list[float], ratio: float, tokens: float) -> float:
    """Standard error of the per-token NELBO R = sum_b F_b / sum_b n_b over rows b (delta method):
    sqrt(sum_b (F_b - R n_b)^2) / sum_b n_b, from the sums of F_b^2, F_b n_b and n_b^2.

    Rows are treated as independent draws; antithetic times make neighbouring rows negatively
    correlated, so this slightly overstates the error of the stratified estimate."""
    f2, fn, n2 = moments
    residual = max(f2 - 2.0 * ratio * fn + ratio * ratio * n2, 0.0)
    return math.sqrt(residual) / tokens
