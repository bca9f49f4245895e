"""Full copies of a sharded model's parameters on global rank 0 (for sampling and diagnostics).

Sampling runs the reverse process one network call after another on a handful of rows: nothing
to gain from splitting it over processes, and the sampler works on the plain model. So rank 0
gets the full weights: within each pipeline stage ``DTensor.full_tensor`` gathers the
tensor-parallel and FSDP shards (a collective over the stage's ranks), and the stages' owners
(data-parallel and tensor-parallel coordinate 0) send their parts to rank 0 over the pipeline group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .mesh import dim_rank, dim_size, dp_rank
from .parallelize import ParallelModel


@torch.no_grad()
def gather_full_parameters(pm: ParallelModel) -> dict[str, torch.Tensor] | None:
    """{name: full CPU tensor} on global rank 0, None on the other ranks (collective on all ranks)."""
    if pm.mesh is None:
        return {name: p.detach().cpu().clone() for name, p in pm.named_parameters()}
    mesh = pm.mesh
    owner = dp_rank(mesh) == 0 and dim_rank(mesh, "tp") == 0
    local: dict[str, torch.Tensor] = {}
    for name, param in pm.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        if owner:
            local[name] = full.detach().cpu().clone()
    if dim_size(mesh, "pp") == 1 or not owner:
        return local if dist.get_rank() == 0 else None
    group = mesh["pp"].get_group()
    destination = dist.get_global_rank(group, 0)
    parts = [None] * dist.get_world_size(group) if dist.get_rank() == destination else None
    dist.gather_object(local, parts, dst=destination, group=group)
    if dist.get_rank() != 0:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return merged
