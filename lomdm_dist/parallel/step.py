"""The step functions the trainer calls, for every layout.

``forward_backward`` takes the arguments of ``diffusion_loss`` and returns its ``LossOutput`` after
accumulating the gradients: a plain forward and backward without pipeline parallelism, the
two-phase pipeline step with it. ``distributed_loss`` is the differentiable loss itself for layouts
without pipeline parallelism; ``evaluation_loss`` the no-grad loss for any layout (validation).

Normalisation: by default the loss is divided by the valid tokens of the *global* batch (summed
over data-parallel ranks), and FSDP sums gradients over those ranks, so gradients equal the
single-process ones on the whole batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import DiffusionConfig
from ..diffusion import randomness
from ..diffusion.objective import LossOutput, diffusion_loss
from ..diffusion.schedulers import Scheduler
from .grads import finalize_gradients
from .mesh import sum_over_dp
from .parallelize import ParallelModel


def global_normalizer(pm: ParallelModel, valid: Tensor) -> Tensor:
    """Valid tokens of the global batch (at least 1), as a float32 scalar on ``valid``'s device."""
    return sum_over_dp(valid.sum().to(torch.float32), pm.mesh).clamp(min=1.0)


def _prepare(pm: ParallelModel, x: Tensor, valid: Tensor | None, normalizer, cfg: DiffusionConfig,
             num_masks: int | None) -> tuple[Tensor, Tensor, int]:
    if valid is None:
        valid = torch.ones_like(x, dtype=torch.bool)
    if normalizer is None:
        normalizer = global_normalizer(pm, valid)
    elif not isinstance(normalizer, Tensor):
        normalizer = torch.tensor(float(normalizer), device=x.device)
    return valid, normalizer, num_masks or cfg.resolved_masks_per_row()


def distributed_loss(pm: ParallelModel, scheduler: Scheduler, x: Tensor, *, cfg: DiffusionConfig, seed: int,
                     step: int, rows: Tensor, global_batch: int, valid: Tensor | None = None,
                     num_masks: int | None = None, normalizer: float | Tensor | None = None,
                     time_stream: int = randomness.STREAM_TIME,
                     mask_stream: int = randomness.STREAM_MASK) -> LossOutput:
    """The differentiable loss of this rank's rows (tensor / sequence / data parallel layouts).

    Pipeline layouts interleave forward and backward per microbatch and cannot return a loss to
    back-propagate: use :func:`forward_backward` there.
    """
    if pm.pipeline is not None:
        raise ValueError("distributed_loss: with parallel.pp > 1 use forward_backward (or evaluation_loss)")
    valid, normalizer, K = _prepare(pm, x, valid, normalizer, cfg, num_masks)
    return diffusion_loss(pm.model, scheduler, x, cfg=cfg, seed=seed, step=step, rows=rows,
                          global_batch=global_batch, valid=valid, num_masks=K, normalizer=normalizer,
                          time_stream=time_stream, mask_stream=mask_stream, token_loss=pm.token_loss,
                          reduce_sums=None if pm.mesh is None else lambda v: sum_over_dp(v, pm.mesh))


def forward_backward(pm: ParallelModel, scheduler: Scheduler, x: Tensor, *, cfg: DiffusionConfig, seed: int,
                     step: int, rows: Tensor, global_batch: int, valid: Tensor | None = None,
                     num_masks: int | None = None, normalizer: float | Tensor | None = None,
                     time_stream: int = randomness.STREAM_TIME,
                     mask_stream: int = randomness.STREAM_MASK) -> LossOutput:
    """Loss and accumulated gradients of one step; the returned values are detached.

    Gradients end complete on the ranks that hold each parameter (partial sequence-parallel
    gradients are reduced here), ready for :func:`~lomdm_dist.parallel.grads.clip_grad_norm_`.
    """
    kwargs = dict(cfg=cfg, seed=seed, step=step, rows=rows, global_batch=global_batch, time_stream=time_stream,
                  mask_stream=mask_stream)
    if pm.pipeline is not None:
        valid, normalizer, K = _prepare(pm, x, valid, normalizer, cfg, num_masks)
        out = pm.pipeline.run(scheduler, x, valid=valid, num_masks=K, normalizer=normalizer, backward=True,
                              **kwargs)
    else:
        out = distributed_loss(pm, scheduler, x, valid=valid, num_masks=num_masks, normalizer=normalizer, **kwargs)
        out.loss.backward()
        out.loss = out.loss.detach()
    finalize_gradients(pm.parameters())
    return out


@torch.no_grad()
def evaluation_loss(pm: ParallelModel, scheduler: Scheduler, x: Tensor, *, cfg: DiffusionConfig, seed: int,
                    step: int, rows: Tensor, global_batch: int, valid: Tensor | None = None,
                    num_masks: int | None = None, normalizer: float | Tensor | None = None,
                    time_stream: int = randomness.STREAM_TIME,
                    mask_stream: int = randomness.STREAM_MASK) -> LossOutput:
    """The loss without gradients, any layout (the same draws as training for the same streams)."""
    kwargs = dict(cfg=cfg, seed=seed, step=step, rows=rows, global_batch=global_batch, time_stream=time_stream,
                  mask_stream=mask_stream)
    if pm.pipeline is not None:
        valid, normalizer, K = _prepare(pm, x, valid, normalizer, cfg, num_masks)
        return pm.pipeline.run(scheduler, x, valid=valid, num_masks=K, normalizer=normalizer, backward=False,
                               **kwargs)
    return distributed_loss(pm, scheduler, x, valid=valid, num_masks=num_masks, normalizer=normalizer, **kwargs)


_SUMMED = ("loss", "nelbo", "l_main", "l_velocity")


def global_loss_values(pm: ParallelModel, out: LossOutput) -> dict[str, float]:
    """What a log line reports for the whole global batch, identical on every rank.

    ``loss``, ``nelbo``, ``l_main`` and ``l_velocity`` are each rank's share of the global value
    (divided by the global token count), so they are summed over data-parallel ranks; ``out.stats``
    already describe the global batch (their sums were reduced before the ratios were taken).
    """
    values = sum_over_dp(torch.stack([getattr(out, n).detach().double().reshape(()) for n in _SUMMED]), pm.mesh)
    return {**{n: values[i].item() for i, n in enumerate(_SUMMED)}, **{k: v.item() for k, v in out.stats.items()}}
