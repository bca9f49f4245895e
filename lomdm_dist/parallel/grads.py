"""Gradient norm and clipping for parameters spread over a device mesh.

``torch.nn.utils.clip_grad_norm_`` sees only this rank's parameters: under pipeline parallelism
it misses the other stages, and it refuses DTensors that live on different meshes (tensor-parallel
weights next to plain replicated ones). Here each gradient contributes its local sum of squares
once: a sharded dimension of its placement sums over that mesh dimension, a replicated one does
not (the copies are equal), and the stages' totals are summed over the pipeline group. The clip
coefficient is the one ``clip_grad_norm_`` uses, so a sharded run clips exactly like one process.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def finalize_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Turn partial DTensor gradients into the parameter's placement.

    Under sequence parallelism the replicated parameters of norms and adaLN modulations get
    ``Partial`` gradients (each rank saw its own positions); FSDP reduces them itself, and without
    FSDP this does, so that after a step every gradient is complete on the ranks that hold it.
    """
    for param in parameters:
        grad = param.grad
        if isinstance(grad, DTensor) and isinstance(param, DTensor) and grad.placements != param.placements:
            param.grad = grad.redistribute(param.device_mesh, param.placements)


def grad_norm(parameters: Iterable[nn.Parameter], pp_group: dist.ProcessGroup | None = None) -> Tensor:
    """Global L2 norm of all gradients (float32 scalar), counting every element once.

    ``pp_group``: sum over pipeline stages (each holds different parameters). Call after
    :func:`finalize_gradients`.
    """
    local: dict[tuple, Tensor] = {}
    device = None
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            if any(p.is_partial() for p in grad.placements):
                raise ValueError("grad_norm: a gradient is still partial; call finalize_gradients first")
            mesh = grad.device_mesh
            # Every placement but Replicate splits the tensor (Shard, and FSDP2's _StridedShard over
            # a tensor-parallel dim, which does not count as is_shard()).
            key = (mesh, tuple(i for i, p in enumerate(grad.placements) if not p.is_replicate()))
            values = grad.to_local()
        else:
            key = (None, ())
            values = grad
        device = values.device
        square = values.detach().float().pow(2).sum()
        local[key] = local[key] + square if key in local else square
    total = torch.zeros((), dtype=torch.float32, device=device or "cpu")
    for (mesh, shard_dims), square in local.items():
        for dim in shard_dims:
            dist.all_reduce(square, group=mesh.get_group(dim))
        total = total + square
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float,
                    pp_group: dist.ProcessGroup | None = None) -> Tensor:
    """Scale gradients so their global norm is at most ``max_norm``; returns the norm before clipping.

    Same rule as ``torch.nn.utils.clip_grad_norm_``: multiply by min(1, max_norm / (norm + 1e-6)).
    A non-finite norm is returned without touching the gradients (the trainer skips that update).
    """
    params = [p for p in parameters if p.grad is not None]
    finalize_gradients(params)
    norm = grad_norm(params, pp_group)
    if not math.isfinite(max_norm) or not torch.isfinite(norm):
        return norm
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for param in params:
        grad = param.grad
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        local.mul_(coef.to(local.device, local.dtype))
    return norm


def pipeline_group(mesh: DeviceMesh | None) -> dist.ProcessGroup | None:
    """The pipeline group of ``mesh`` when there is more than one stage rank."""
    if mesh is None or "pp" not in (mesh.mesh_dim_names or ()) or mesh["pp"].size() == 1:
        return None
    return mesh["pp"].get_group()
