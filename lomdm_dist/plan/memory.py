"""Memory per GPU of one training step: model state under the layout's sharding, activations, and
the transient peaks of backward.

Model state (``train/trainer.py``, ``parallel/fsdp.py``): fp32 master weights, fp32 gradients,
AdamW's two fp32 moments and the fp32 EMA shadow (built from the sharded parameters, so sharded
too): 20 bytes per parameter, divided by tensor parallelism (the sharded part of each module),
by the pipeline (a rank holds its stage's parts) and by FSDP's ``dp_shard`` (HSDP replicates over
``dp_replicate``, which does not divide). FSDP2 gathers each unit's parameters in the compute
dtype before use (one unit plus the prefetched next) and materialises its unsharded gradient in
backward; under pipeline parallelism it keeps the stage's gathered parameters between forward
and backward (``reshard_after_forward=False``). One process has no FSDP: autocast then caches a
bf16 copy of every weight a matmul uses for the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass

from .activations import FP32, Numerics, Shape, Split
from .params import ParamCount

GiB = float(1 << 30)

STATE_BYTES_PER_PARAM = {"master weights (fp32)": FP32, "gradients (fp32)": FP32,
                         "AdamW moments (fp32, 2)": 2 * FP32, "EMA shadow (fp32)": FP32}


@dataclass(frozen=True)
class StageParams:
    """Parameters one rank holds, before FSDP sharding (after TP and the pipeline split)."""

    total: float
    """Everything the rank's stage(s) own, divided by TP."""
    largest_unit: float
    """The largest FSDP unit (a block, the embedding or the output layer), divided by TP."""
    matmul: float
    """Weights that matmuls use (what autocast caches in bf16 without FSDP)."""


def stage_params(params: ParamCount, split: Split, *, pp: int, first: bool, last: bool) -> StageParams:
    """Parameters of one pipeline rank: its share of the blocks, the embedding and conditioning on
    the first stage, the output layer and the heads on the last (``parallel/pipeline.py``)."""
    tp = split.tp
    blocks = params.n_layers // pp
    total = blocks * params.block.per_tp_rank(tp)
    units = [params.block.per_tp_rank(tp)]
    if first:
        total += params.embedding.per_tp_rank(tp) + params.conditioning.per_tp_rank(tp)
        units.append(params.embedding.per_tp_rank(tp))
    if last:
        total += params.output.per_tp_rank(tp) + params.heads.per_tp_rank(tp)
        units += [params.output.per_tp_rank(tp), params.head.per_tp_rank(tp)]
    # Norm weights and biases are not matmul weights; they are < 0.1% of a block, so the cache is
    # taken as every parameter but the embedding (a lookup, which autocast does not cast).
    matmul = total - (params.embedding.per_tp_rank(tp) if first else 0.0)
    return StageParams(total=total, largest_unit=max(units), matmul=matmul)


def model_state_bytes(stage: StageParams, *, dp_shard: int, dp: int, pp: int, num: Numerics) -> dict[str, float]:
    """Model state and FSDP's working copies, per GPU, itemised."""
    shard = stage.total / dp_shard
    out = {name: per * shard for name, per in STATE_BYTES_PER_PARAM.items()}
    e = num.compute_bytes
    if dp > 1:
        unit = stage.largest_unit
        if pp > 1:
            out["FSDP gathered stage parameters (kept under PP)"] = stage.total * e
        else:
            out["FSDP gathered parameters (unit + prefetch)"] = 2 * unit * e
        # Backward: the unit's unsharded gradient in the compute dtype and its fp32 copy for the
        # reduce-scatter (reduce_dtype fp32).
        out["FSDP unsharded gradient of one unit"] = unit * (e + FP32)
    elif e < FP32:
        out["autocast bf16 weight copies"] = stage.matmul * e
    return out


def transient_bytes(*, masked_tokens: float, rows: int, seq_len: int, s: Shape, num: Numerics, split: Split,
                    ac: str, recompute_block: float) -> dict[str, float]:
    """The largest short-lived buffers on top of the saved activations: the loss backward's logits
    gradients, or (with checkpointing) one block's recomputed activations plus the gradient of the
    MLP's hidden layer. The larger of the two is counted."""
    V = s.vocab_size / split.tp
    e = num.compute_bytes
    if num.device == "cuda":
        loss = masked_tokens * V * e                        # the kernel writes d logits in their dtype
    else:
        loss = masked_tokens * V * (FP32 + e)               # fp32 grad of the filled copy, then the cast back
    mlp_grad = 2 * rows * seq_len * s.mlp_ratio * s.d_model * e / split.tp
    recompute = (recompute_block if ac != "none" else 0.0) + mlp_grad
    if loss >= recompute:
        return {"loss backward (logits gradient)": loss}
    return {"block backward (recompute + MLP gradients)": recompute}
