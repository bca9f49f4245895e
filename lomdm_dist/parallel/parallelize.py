"""``parallelize_model``: apply the layout to a plain model, in torchtitan's order.

pipeline split -> tensor/sequence parallelism -> activation checkpointing -> compile -> FSDP2
-> materialisation. Each step works on the plain ``LoMDM`` from the outside; parameter names never
change, so the optimizer's parameter groups, the EMA and the checkpoints are keyed the same in
every layout.

The model comes either on the meta device (``with torch.device("meta"): build_model(...)``, with
``init_seed``): it is laid out without memory and each rank then allocates and initialises only its
own shard (``materialize.py``), with the values ``build_model(..., seed=init_seed)`` gives in one
process; or with real weights, the same on every rank (a one-process model, a test's copy): then
sharding cuts each rank's piece out of its full copy.

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
from .materialize import materialize
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


def _on_meta(model: nn.Module, init_seed: int | None) -> bool:
    """Whether ``model`` is to be materialised here; refuses a mix and a seed that would be ignored."""
    meta = [name for name, param in model.named_parameters() if param.is_meta]
    if not meta:
        if init_seed is not None:
            raise ValueError("parallelize_model: init_seed is for a model built on the meta device; this model "
                             "already has weights (build it under torch.device('meta') or drop init_seed)")
        return False
    if len(meta) != len(list(model.parameters())):
        raise ValueError(f"parallelize_model: parameter {meta[0]} is on the meta device but others are not")
    if init_seed is None:
        raise ValueError("parallelize_model: the model is on the meta device; pass init_seed (the value "
                         "build_model(..., seed=...) would use) so every rank initialises its own shard")
    return True


def parallelize_model(model: nn.Module, mesh: DeviceMesh | None, cfg: Any, *, device: torch.device | str | None = None,
                      param_dtype: torch.dtype | None = None, init_seed: int | None = None) -> ParallelModel:
    """Split, shard and wrap ``model`` (a ``LoMDM``) for ``mesh``; returns the handle.

    ``cfg``: the full config (its ``parallel`` section is used) or a ``ParallelConfig``.
    ``param_dtype``: FSDP2 mixed precision (e.g. ``torch.bfloat16`` on GPU; gradients are reduced in
    fp32); None keeps the parameters' dtype. ``init_seed``: required for, and only for, a model on
    the meta device, which is laid out first and then materialised shard by shard on ``device``
    (default: the CPU).
    """
    par = parallel_section(cfg)
    meta = _on_meta(model, init_seed)
    if device is not None:
        device = torch.device(device)
    else:
        device = torch.device("cpu") if meta else next(model.parameters()).device
    if not meta:
        model.to(device)
    vocab_start = _apply_layout(model, mesh, par, param_dtype)
    if meta:
        materialize(model, device, init_seed)
    if mesh is None:
        return ParallelModel(model=model, mesh=None, parallel=par, vocab_parallel=None, pipeline=None)
    vocab_parallel = VocabParallel(mesh["tp"].get_group(), vocab_start) if vocab_start is not None else None
    # the pipeline's stages are built from the parameters, so after materialisation
    pipeline = PipelineRunner(model, mesh, par, device, vocab_parallel) if par.pp > 1 else None
    return ParallelModel(model=model, mesh=mesh, parallel=par, vocab_parallel=vocab_parallel, pipeline=pipeline)


def _apply_layout(model: nn.Module, mesh: DeviceMesh | None, par: ParallelConfig,
                  param_dtype: torch.dtype | None) -> int | None:
    """The layout steps, in place; they allocate nothing, so they work on the meta device too.
    Returns the first vocabulary id of this rank's output slice (None: not vocab-parallel)."""
    if mesh is None:
        apply_activation_checkpointing(model, par.activation_checkpointing)
        if par.compile:
            apply_compile(model)
        return None
    if par.pp > 1:
        keep_stage_parts(model, rank_stages(mesh["pp"].get_local_rank(), par.pp, par.virtual_stages),
                         par.num_stages)
    apply_tensor_parallel(model, mesh["tp"], sequence_parallel=par.sequence_parallel and par.tp > 1)
    start = vocab_slice_start(model)  # before FSDP, which turns every weight into a DTensor
    apply_activation_checkpointing(model, par.activation_checkpointing)
    if par.compile:
        apply_compile(model)
    if par.dp > 1:
        apply_fsdp(model, dp_mesh(mesh), param_dtype=param_dtype, reshard_after_forward=par.pp == 1)
    return start
