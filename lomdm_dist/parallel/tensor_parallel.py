"""Megatron-style tensor and sequence parallelism, applied to the plain model with DTensor plans.

Per DiT block (backbone and the phi/psi heads alike):

* ``attn.q_proj``, ``k_proj``, ``v_proj`` and ``mlp.fc1`` column-parallel (each rank holds
  ``n_heads / tp`` heads and ``mlp_width / tp`` hidden units), ``attn.o_proj`` and ``mlp.fc2``
  row-parallel: one all-reduce after attention and one after the MLP (Megatron's f/g pair).
* The norms and the adaLN ``modulation`` stay replicated.

Model-level: the token embedding is vocab-parallel (``RowwiseParallel`` on the embedding table:
each rank looks up its vocabulary rows, one all-reduce), the output projection ``final.linear`` is
column-parallel over the vocabulary and hands each rank its slice of the logits, which the
vocab-parallel loss consumes without ever gathering them (``loss.py``). The phi/psi read-out MLP
(``proj`` column-, ``out`` row-parallel) is split like a block's MLP.

Sequence parallelism (``parallel.sequence_parallel``): between the projections the activations are
sharded along the sequence, so norms, modulation, residual adds and dropout run on L / tp
positions. The embedding reduce-scatters into sequence shards, ``attn`` and ``mlp`` all-gather the
sequence on entry (``PrepareModuleInput``) and their row-parallel output reduce-scatters back. The
replicated parameters that now see only their rank's positions become replicated DTensors whose
gradients DTensor sums over the group (``SequenceParallel`` for the norms, ``ReplicatedSPLinear``
for the modulation, whose output gradient is declared partial). After the last backbone block,
and around each head's block, the sequence is gathered again: the output layer, the loss and the
NormSig mean over positions then see whole rows. We chose to gather the (B, L, d) features once
rather than all-reduce NormSig's mean, because the vocab-parallel output layer needs the same rows
on every tensor-parallel rank anyway.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput,
                                               PrepareModuleInputOutput, PrepareModuleOutput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from ..model import DiTBlock


class ReplicatedSPLinear(ParallelStyle):
    """A replicated Linear whose per-row output multiplies sequence-sharded activations.

    The adaLN modulation maps the conditioning (B, cond_dim), identical on every rank, to shift,
    scale and gate (B, 6d) that are broadcast over the rank's own positions. The gradient of that
    output is therefore a partial sum over positions: declaring it ``Partial`` makes DTensor
    all-reduce it before it reaches the conditioning MLP, and leaves the weight's gradient as a
    partial replicated DTensor that the optimizer step (or FSDP) reduces.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate_inputs(mod, inputs, mesh):
            return tuple(DTensor.from_local(t, mesh, (Replicate(),), run_check=False) for t in inputs)

        def partial_grad_output(mod, output, mesh):
            return output.to_local(grad_placements=(Partial(),))

        return distribute_module(module, device_mesh, None, replicate_inputs, partial_grad_output)


def block_plan(sequence_parallel: bool, gather_output: bool = False, scatter_input: bool = False
               ) -> tuple[dict[str, ParallelStyle], ParallelStyle | None]:
    """The plan for the submodules of one ``DiTBlock`` and the style for the block itself.

    ``scatter_input``: the block receives whole rows (a head reading the backbone's features) and
    must cut out its sequence shard first; ``gather_output``: the block's output leaves the
    sequence-parallel region (last backbone block, head blocks). Both only matter under sequence
    parallelism; the block style is None otherwise.
    """
    shard_out = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {
        "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(output_layouts=shard_out),
        "mlp.fc1": ColwiseParallel(),
        "mlp.fc2": RowwiseParallel(output_layouts=shard_out),
    }
    if not sequence_parallel:
        return plan, None
    plan.update({
        "norm1": SequenceParallel(use_local_output=True),
        "norm2": SequenceParallel(use_local_output=True),
        "attn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "modulation": ReplicatedSPLinear(),
    })
    scatter = dict(input_layouts=(Replicate(), None), desired_input_layouts=(Shard(1), None))
    gather = dict(output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True)
    block_style: ParallelStyle | None = None
    if scatter_input and gather_output:
        block_style = PrepareModuleInputOutput(**scatter, use_local_input=True, **gather)
    elif scatter_input:
        block_style = PrepareModuleInput(**scatter, use_local_output=True)
    elif gather_output:
        block_style = PrepareModuleOutput(**gather)
    return plan, block_style


def _parallelize_block(block: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool, *,
                       gather_output: bool = False, scatter_input: bool = False) -> None:
    plan, block_style = block_plan(sequence_parallel, gather_output=gather_output, scatter_input=scatter_input)
    parallelize_module(block, tp_mesh, plan)
    if block_style is not None:
        parallelize_module(block, tp_mesh, block_style)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool = False) -> None:
    """Shard ``model`` (a ``LoMDM``, possibly a pipeline stage's part of it) in place over ``tp_mesh``.

    Parts a pipeline stage does not hold (``None`` attributes, placeholder blocks) are skipped.
    Parameter names do not change.
    """
    if tp_mesh.size() == 1:
        return
    backbone = model.backbone
    n_layers = len(backbone.blocks)
    if backbone.embed is not None:
        parallelize_module(backbone, tp_mesh, {
            "embed": RowwiseParallel(input_layouts=Replicate(),
                                     output_layouts=Shard(1) if sequence_parallel else Replicate())})
    for index, block in enumerate(backbone.blocks):
        if isinstance(block, DiTBlock):
            _parallelize_block(block, tp_mesh, sequence_parallel, gather_output=index == n_layers - 1)
    if backbone.final is not None:
        parallelize_module(backbone.final, tp_mesh, {
            "linear": ColwiseParallel(output_layouts=Shard(-1), use_local_output=True)})
    for head in (model.phi, model.psi):
        if head is None:
            continue
        _parallelize_block(head.block, tp_mesh, sequence_parallel, gather_output=True, scatter_input=True)
        parallelize_module(head, tp_mesh, {"proj": ColwiseParallel(), "out": RowwiseParallel()})


def vocab_slice_start(model: nn.Module) -> int | None:
    """First vocabulary id of this rank's slice of the output logits (None: not vocab-parallel).

    DTensor shards like ``torch.chunk``: every slice but the last holds ceil(V / tp) rows.
    """
    final = getattr(model.backbone, "final", None)
    weight = None if final is None else final.linear.weight
    if not isinstance(weight, DTensor):
        return None
    placement = weight.placements[0]
    if not isinstance(placement, Shard) or placement.dim != 0:
        raise ValueError(f"final.linear.weight has placement {weight.placements}, expected Shard(0)")
    vocab, tp = weight.shape[0], weight.device_mesh.size()
    chunk = -(-vocab // tp)
    return min(weight.device_mesh.get_local_rank() * chunk, vocab)
