"""``parallelize_model``: apply the layout to a plain model, in torchtitan's order.

pipeline split -> tensor/sequence parallelism -> activation checkpointing -> compile -> FSDP2.
Each step works on the plain ``LoMDM`` from the outside; parameter names never change, so the
optimizer's parameter groups, the EMA and the checkpoints are keyed the same in every layout.

The model must hold the same weights on every rank when it is handed over (build it under the
same ``torch.manual_seed`` everywhere, or load a checkpoint): sharding cuts each rank's piece out
of its full copy, which makes the initialisation independent of the layout.

``mesh=None`` is one process: nothing is split or sharded, activation checkpointing and compile
still apply, and ``pm.model`` is the plain model itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .activation_checkpointing import apply_activation_checkpointing, apply_compile
from .config import ParallelConfig
from .fsdp import apply_fsdp, dp_mesh
from .grads import pipeline_group
from .layout import parallel_section
from .loss import VocabParallel, token_loss_for
from .pipeline import PipelineRunner, keep_stage_parts, rank_stages
from .tensor_parallel import apply_tensor_parallel, vocab_slice_start


@dataclass
class ParallelModel:
    """This rank's part of the model and how it is laid out.

    ``model`` is the (pruned, sharded) ``LoMDM``: give its parameters to the optimizer and the EMA.
    """

    model: nn.Module
    mesh: DeviceMesh | None
    parallel: ParallelConfig
    vocab_parallel: VocabParallel | None
    pipeline: PipelineRunner | None

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.model.named_parameters()

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    @property
    def pp_group(self):
        return pipeline_group(self.mesh)

    @property
    def token_loss(self):
        """The per-token loss of this layout (vocab-parallel under tensor parallelism)."""
        return token_loss_for(self.vocab_parallel)

    @property
    def training(self) -> bool:
        return self.model.training

    @property
    def is_plain(self) -> bool:
        """True when ``model`` is the whole, unsharded model (one process)."""
        return self.mesh is None

    def train(self, mode: bool = True) -> "ParallelModel":
        self.model.train(mode)
        return self

    def eval(self) -> "ParallelModel":
        return self.train(False)


def _check_materialised(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if param.is_meta:
            raise ValueError(f"parallelize_model: parameter {name} is on the meta device; materialise the model "
                             "(to_empty + init_weights under the same seed on every rank, or load a checkpoint) first")


def parallelize_model(model: nn.Module, mesh: DeviceMesh | None, cfg: Any, *, device: torch.device | str | None = None,
                      param_dtype: torch.dtype | None = None) -> ParallelModel:
    """Split, shard and wrap ``model`` (a ``LoMDM`` with real weights) for ``mesh``; returns the handle.

    ``cfg``: the full config (its ``parallel`` section is used) or a ``ParallelConfig``.
    ``param_dtype``: FSDP2 mixed precision (e.g. ``torch.bfloat16`` on GPU; gradients are reduced in
    fp32); None keeps the parameters' dtype.
    """
    par = parallel_section(cfg)
    _check_materialised(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    if mesh is None:
        apply_activation_checkpointing(model, par.activation_checkpointing)
        if par.compile:
            apply_compile(model)
        return ParallelModel(model=model, mesh=None, parallel=par, vocab_parallel=None, pipeline=None)
    if par.pp > 1:
        keep_stage_parts(model, rank_stages(mesh["pp"].get_local_rank(), par.pp, par.virtual_stages),
                         par.num_stages)
    tp_mesh = mesh["tp"]
    apply_tensor_parallel(model, tp_mesh, sequence_parallel=par.sequence_parallel and par.tp > 1)
    start = vocab_slice_start(model)  # before FSDP, which turns every weight into a DTensor
    apply_activation_checkpointing(model, par.activation_checkpointing)
    if par.compile:
        apply_compile(model)
    if par.dp > 1:
        apply_fsdp(model, dp_mesh(mesh), param_dtype=param_dtype, reshard_after_forward=par.pp == 1)
    vocab_parallel = VocabParallel(tp_mesh.get_group(), start) if start is not None else None
    pipeline = PipelineRunner(model, mesh, par, device, vocab_parallel) if par.pp > 1 else None
    return ParallelModel(model=model, mesh=mesh, parallel=par, vocab_parallel=vocab_parallel, pipeline=pipeline)
