"""Materialise a laid-out model built on the meta device: each rank allocates and fills its own shard.

The torchtitan order: ``build_model`` under ``torch.device("meta")`` (no memory), then the layout
(pipeline pruning, tensor parallelism, FSDP2) turns parameters into meta DTensors, then
``to_empty`` allocates each rank's local pieces and :func:`materialize_parameters` writes into them
the values the one-process model would have: ``model/init.py`` gives any slice of any parameter
from (seed, name), and here the slice of a DTensor is found from its placements. A rank therefore
never holds more than its shard plus one generator block, whatever the size of the model.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.distributed.tensor import DTensor
# Private, but the function Distributed Checkpoint itself uses to place a shard in the full tensor
# (uneven splits and FSDP-over-TP strided shards included); a public equivalent does not exist.
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..model.init import ParamInit, fill_shard_, init_plan


def local_offset(param: DTensor) -> tuple[int, ...]:
    """Where this rank's local tensor of ``param`` starts in the full tensor (one offset per dim).

    Every placement the engine uses gives each rank one contiguous block (Shard, FSDP's strided
    shard of a tensor-parallel shard, Replicate); the local shape is checked against the placement
    arithmetic so a layout that broke that assumption fails here instead of initialising wrongly.
    """
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = param.to_local()
    if tuple(local.shape) != tuple(shape):
        raise ValueError(f"local shard of shape {tuple(local.shape)} does not match the placements "
                         f"{param.placements} of a parameter of shape {tuple(param.shape)} (expected {tuple(shape)})")
    return tuple(offset)


def materialize_parameters(model: nn.Module, seed: int, plan: Mapping[str, ParamInit] | None = None) -> None:
    """Fill this rank's part of every parameter named in ``plan`` (default: all, ``init_plan``) from ``seed``.

    The parameters must already be allocated (``model.to_empty(device=...)``). The values equal
    those of ``build_model(..., seed=seed)`` in one process, entry for entry, in any layout.
    """
    plan = init_plan(model) if plan is None else plan
    params = dict(model.named_parameters())
    unknown = sorted(set(plan) - set(params))
    if unknown:
        raise ValueError(f"init plan names parameters this rank does not hold: {', '.join(unknown[:5])}")
    with torch.no_grad():
        for name, spec in plan.items():
            param = params[name]
            if param.is_meta:
                raise ValueError(f"parameter {name} is on the meta device: call model.to_empty(device=...) first")
            if isinstance(param, DTensor):
                try:
                    offset = local_offset(param)
                except ValueError as error:
                    raise ValueError(f"parameter {name}: {error}") from None
                fill_shard_(param.to_local(), spec, seed=seed, name=name, global_shape=param.shape, offset=offset)
            else:
                fill_shard_(param.data, spec, seed=seed, name=name, global_shape=param.shape)


def materialize(model: nn.Module, device: torch.device | str, seed: int) -> None:
    """Allocate the (laid-out) meta model's local pieces on ``device`` and initialise them from ``seed``.

    Buffers are not initialised: the model has none (the rotary tables are recomputed per call),
    and one appearing would be caught here rather than left as uninitialised memory.
    """
    buffers = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if buffers:
        raise ValueError(f"meta-device buffers have no initialisation rule: {', '.join(buffers[:5])}")
    model.to_empty(device=device)
    materialize_parameters(model, seed)
