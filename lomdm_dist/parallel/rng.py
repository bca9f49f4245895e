"""Dropout randomness per rank.

The step's draws (t, masks) are counter-based and layout-free; dropout uses torch's generator,
whose state must follow the layout:

* tensor-parallel peers hold the *same* activations outside sequence-parallel regions, so they
  must drop the same elements: same seed across the tp group (else the replicas diverge);
* under sequence parallelism each tp rank holds different positions and should draw its own mask
  (the same seed would drop the same pattern in every shard);
* data-parallel ranks see different rows and pipeline stages different layers: own seeds.

Dropout therefore differs between layouts (the equality tests set ``model.dropout = 0``), but
within one layout it is correct and reproducible.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from ..diffusion.randomness import scalar_key


def dropout_seed(seed: int, *, dp_rank: int, pp_rank: int, tp_rank: int, sequence_parallel: bool) -> int:
    """The generator seed of a rank: a hash of its coordinates (tp only under sequence parallelism)."""
    return scalar_key(seed, 0x5EED, dp_rank, pp_rank, tp_rank if sequence_parallel else 0)


def seed_dropout(seed: int, mesh: DeviceMesh | None, sequence_parallel: bool) -> int:
    """Seed torch's generators (CPU and CUDA) for this rank; returns the seed used."""
    from .mesh import dim_rank, dp_rank

    value = dropout_seed(seed, dp_rank=dp_rank(mesh), pp_rank=dim_rank(mesh, "pp"),
                         tp_rank=dim_rank(mesh, "tp"), sequence_parallel=sequence_parallel)
    torch.manual_seed(value)
    return value
