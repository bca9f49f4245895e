"""FSDP2 / HSDP over the data-parallel dimensions of the mesh.

Units: every DiT block (backbone and heads' blocks), and separately the embedding, the
conditioning MLP, the final layer and each head. The objective calls these parts directly
(``backbone.features``, ``output_logits``, ``model.phi``...) and never the root ``LoMDM.forward``,
so each part that owns parameters must be its own unit for FSDP's pre-forward hook to gather it.

Gradients are *summed* over data-parallel ranks (divide factor 1): every rank's loss is already
divided by the global token count, so the sum is the gradient of the global loss, whatever the
number of ranks and however the padding is spread over them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from ..model import DiTBlock


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP shards over: (dp_replicate, dp_shard) for HSDP, else dp_shard alone."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules to wrap, children before parents (fully_shard's required order)."""
    backbone = model.backbone
    units: list[nn.Module] = []
    for part in (backbone.embed, backbone.sigma_map):
        if part is not None:
            units.append(part)
    units.extend(block for block in backbone.blocks if isinstance(block, DiTBlock))
    if backbone.final is not None:
        units.append(backbone.final)
    for head in (model.phi, model.psi):
        if head is not None:
            units.extend([head.block, head])
    return units


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None,
               reshard_after_forward: bool = True) -> None:
    """Shard the parameters of ``model`` over ``mesh`` in place (names unchanged).

    ``param_dtype``: compute dtype of the gathered parameters (bf16 on GPU); gradients are reduced
    in fp32. ``reshard_after_forward`` is False under pipeline parallelism, where a stage runs
    several microbatch forwards before their backwards.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            # Plain sum reductions: gloo has no PREMUL_SUM, and a factor of 1 needs no scaling anyway.
            unit.set_force_sum_reduction_for_comms(True)
