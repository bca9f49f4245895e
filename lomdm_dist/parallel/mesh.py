"""The device mesh: named dimensions ``(pp, dp_replicate, dp_shard, tp)``, tp innermost.

tp is the fastest-varying dimension so that a tensor-parallel group is made of neighbouring ranks
(on a GPU node: the NVLink-connected devices); pp is the slowest, so pipeline neighbours may live
on different nodes, where only point-to-point traffic crosses. Every dimension exists even when
its size is 1, so code can always ask for ``mesh["tp"]`` without branching on the layout.

One process needs no process group: ``build_mesh`` returns ``None`` for a world of one, and every
helper here (and ``parallelize_model``, the step, the evaluation, the checkpoints) reads ``None``
as the trivial layout. The trainer therefore runs the same calls on one process as on many, and
a single-process run (or a test) never leaves a process group behind.

The helpers here answer the questions the rest of the engine asks about a rank: which slice of
the global batch is mine (data-parallel index), and how to sum a statistic over the batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import ParallelConfig
from .layout import validate_layout

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_mesh(cfg: Any, world_size: int | None = None, *, parallel: ParallelConfig | None = None,
               device_type: str | None = None) -> DeviceMesh | None:
    """Validate the layout, then build the 4-D mesh (:func:`mesh_from_layout`); ``None`` for a world
    of one. For callers that hold an unchecked layout; the trainer checks once and calls
    :func:`mesh_from_layout`."""
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    return mesh_from_layout(validate_layout(cfg, world_size, parallel), device_type=device_type)


def mesh_from_layout(par: ParallelConfig, *, device_type: str | None = None) -> DeviceMesh | None:
    """The 4-D mesh of a checked layout (what ``validate_layout`` returned), initialising the
    default process group from the torchrun environment if it is not initialised yet; ``None``
    for a world of one."""
    world_size = par.world_size
    if world_size == 1:
        return None
    if dist.is_initialized() and dist.get_world_size() != world_size:
        raise ValueError(f"build_mesh: world_size {world_size} differs from the process group's "
                         f"{dist.get_world_size()}")
    shape = (par.pp, par.dp_replicate, par.dp_shard, par.tp)
    return init_device_mesh(device_type or default_device_type(), shape, mesh_dim_names=MESH_DIMS)


def dim_size(mesh: DeviceMesh | None, name: str) -> int:
    return 1 if mesh is None else mesh[name].size()


def dim_rank(mesh: DeviceMesh | None, name: str) -> int:
    return 0 if mesh is None else mesh[name].get_local_rank()


def writes_dp_slice_state(mesh: DeviceMesh | None) -> bool:
    """Whether this rank speaks for its data-parallel slice (tp rank 0 of pipeline stage 0): it
    writes the slice's data-loader state; its tp and pp peers read the same rows."""
    return dim_rank(mesh, "tp") == 0 and dim_rank(mesh, "pp") == 0


def dp_size(mesh: DeviceMesh | None) -> int:
    """Number of distinct batch slices: dp_replicate x dp_shard."""
    return dim_size(mesh, "dp_replicate") * dim_size(mesh, "dp_shard")


def dp_rank(mesh: DeviceMesh | None) -> int:
    """This rank's batch slice, replicate-major (the order FSDP2/HSDP uses)."""
    return dim_rank(mesh, "dp_replicate") * dim_size(mesh, "dp_shard") + dim_rank(mesh, "dp_shard")


def local_rows(mesh: DeviceMesh | None, global_batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Global row indices (int64) of this rank's slice of a global batch.

    Contiguous blocks in data-parallel order, so the global batch is the same rows in the same
    order for every dp size; tp and pp peers of a rank get the same rows.
    """
    size = dp_size(mesh)
    if global_batch % size:
        raise ValueError(f"global batch {global_batch} is not divisible by the data-parallel size {size}")
    per_rank = global_batch // size
    first = dp_rank(mesh) * per_rank
    return torch.arange(first, first + per_rank, device=device, dtype=torch.int64)


def sum_over_dp(value: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """Sum a tensor over the data-parallel ranks (e.g. the global token count); returns a new tensor."""
    out = value.detach().clone()
    for name in ("dp_replicate", "dp_shard"):
        if dim_size(mesh, name) > 1:
            dist.all_reduce(out, group=mesh[name].get_group())
    return out
