"""The step functions the trainer calls, for every layout.

Each runs ``diffusion_loss`` with the :class:`~lomdm_dist.diffusion.objective.Passes` of the layout:
``PlainPasses`` on the (tensor / sequence / data parallel) model with its per-token loss and the
sum over data-parallel ranks, or ``PipelinePasses`` under pipeline parallelism.
``forward_backward`` returns the ``LossOutput`` after accumulating the gradients;
``distributed_loss`` is the differentiable loss itself for layouts without pipeline parallelism;
``evaluation_loss`` the no-grad loss for any layout (validation). All take ``diffusion_loss``'s
arguments.

Normalisation: by default the loss is divided by the valid tokens of the *global* batch (summed
over data-parallel ranks), and FSDP sums gradients over those ranks, so gradients equal the
single-process ones on the whole batch.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..config import DiffusionConfig
from ..diffusion.objective import LossOutput, Passes, PlainPasses, StepSpec, diffusion_loss
from ..diffusion.schedulers import Scheduler
from .grads import finalize_gradients
from .mesh import sum_over_dp
from .parallelize import ParallelModel
from .pipeline import PipelinePasses


def global_normalizer(pm: ParallelModel, valid: Tensor) -> Tensor:
    """Valid tokens of the global batch (at least 1), as a float32 scalar on ``valid``'s device."""
    return sum_over_dp(valid.sum().to(torch.float32), pm.mesh).clamp(min=1.0)


def _global(pm: ParallelModel, x: Tensor, spec: StepSpec, valid: Tensor | None) -> tuple[StepSpec, Tensor]:
    """(``spec`` with its normaliser a tensor, the global token count by default; ``valid``)."""
    if valid is None:
        valid = torch.ones_like(x, dtype=torch.bool)
    if spec.normalizer is None:
        spec = replace(spec, normalizer=global_normalizer(pm, valid))
    elif not isinstance(spec.normalizer, Tensor):
        spec = replace(spec, normalizer=torch.tensor(float(spec.normalizer), device=x.device))
    return spec, valid


def _passes(pm: ParallelModel, *, backward: bool) -> Passes:
    if pm.pipeline is not None:
        return PipelinePasses(pm.pipeline, backward=backward)
    return PlainPasses(pm.model, token_loss=pm.token_loss,
                       reduce_sums=None if pm.mesh is None else lambda v: sum_over_dp(v, pm.mesh))


def distributed_loss(pm: ParallelModel, scheduler: Scheduler, x: Tensor, spec: StepSpec, *, cfg: DiffusionConfig,
                     valid: Tensor | None = None) -> LossOutput:
    """The differentiable loss of this rank's rows (tensor / sequence / data parallel layouts).

    Pipeline layouts interleave forward and backward per microbatch and cannot return a loss to
    back-propagate: use :func:`forward_backward` there.
    """
    if pm.pipeline is not None:
        raise ValueError("distributed_loss: with parallel.pp > 1 use forward_backward (or evaluation_loss)")
    spec, valid = _global(pm, x, spec, valid)
    return diffusion_loss(pm.model, scheduler, x, spec, cfg=cfg, valid=valid, passes=_passes(pm, backward=False))


def forward_backward(pm: ParallelModel, scheduler: Scheduler, x: Tensor, spec: StepSpec, *, cfg: DiffusionConfig,
                     valid: Tensor | None = None) -> LossOutput:
    """Loss and accumulated gradients of one step; the returned values are detached.

    Gradients end complete on the ranks that hold each parameter (partial sequence-parallel
    gradients are reduced here), ready for :func:`~lomdm_dist.parallel.grads.clip_grad_norm_`.
    """
    spec, valid = _global(pm, x, spec, valid)
    out = diffusion_loss(pm.model, scheduler, x, spec, cfg=cfg, valid=valid, passes=_passes(pm, backward=True))
    if pm.pipeline is None:
        out.loss.backward()
        out.loss = out.loss.detach()
    finalize_gradients(pm.parameters())
    return out


@torch.no_grad()
def evaluation_loss(pm: ParallelModel, scheduler: Scheduler, x: Tensor, spec: StepSpec, *, cfg: DiffusionConfig,
                    valid: Tensor | None = None) -> LossOutput:
    """The loss without gradients, any layout (the same draws as training for the same streams)."""
    spec, valid = _global(pm, x, spec, valid)
    return diffusion_loss(pm.model, scheduler, x, spec, cfg=cfg, valid=valid, passes=_passes(pm, backward=False))


_SUMMED = ("loss", "nelbo", "l_main", "l_velocity")


def global_loss_values(pm: ParallelModel, out: LossOutput) -> dict[str, float]:
    """What a log line reports for the whole global batch, identical on every rank.

    ``loss``, ``nelbo``, ``l_main`` and ``l_velocity`` are each rank's share of the global value
    (divided by the global token count), so they are summed over data-parallel ranks; ``out.stats``
    already describe the global batch (their sums were reduced before the ratios were taken).
    """
    values = sum_over_dp(torch.stack([getattr(out, n).detach().double().reshape(()) for n in _SUMMED]), pm.mesh)
    return {**{n: values[i].item() for i, n in enumerate(_SUMMED)}, **{k: v.item() for k, v in out.stats.items()}}
