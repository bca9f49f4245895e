"""Bytes that one LoMDM training step saves for backward, counted tensor by tensor from the code.

Every term below names the operation in ``lomdm_dist/model/`` or ``lomdm_dist/diffusion/objective.py``
that saves the tensor (autograd keeps an op's inputs or outputs when its backward needs them) and
its dtype. Tensors that share storage are counted once, the way ``measure.saved_tensor_bytes``
dedupes them; parameters (and their autocast copies) are not activations and are counted in
``memory.py``. ``tests/test_plan.py`` compares the sum with the bytes autograd actually saves on
CPU; docs/planning.md lists the terms.

Dtypes follow the trainer's mixed precision: under bf16 autocast Linear, SDPA and the MLP run in
bf16, the fp32 LayerNorms (``FP32LayerNorm``) and what follows them until the next Linear stay fp32,
and the residual stream is fp32 when the parameters are (one process) or bf16 when FSDP gathers
them in bf16. Autocast does not cache casts of activations, so the three q/k/v projections each
save their own bf16 copy of the same input.

Tensor and sequence parallelism (``parallel/tensor_parallel.py``): column-parallel outputs (q, k,
v, attention output, the MLP hidden layer, the heads' read-out hidden layer, the logits) are
divided by tp; inputs of the projections are whole on every rank (the sequence is all-gathered
before attn and mlp under SP, and the Linears save the gathered input); norms, modulate, dropout
and residuals are divided by tp only under sequence parallelism. These TP/SP rules come from the
plans, not from a measurement (the CPU test runs one process).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..parallel.flops import SINUSOID_DIM

FP32 = 4
INT64 = 8
BOOL = 1


@dataclass(frozen=True)
class Numerics:
    """The dtypes one step runs with, which set the size of every saved tensor."""

    compute_bytes: int
    """Bytes per element of autocast's compute dtype: 2 (bf16 autocast) or 4 (fp32)."""
    residual_bytes: int
    """Bytes per element of the residual stream and the conditioning: 4 when the parameters are fp32
    during compute, 2 when FSDP gathers them in bf16."""
    device: str = "cuda"
    """``cuda``: dropout saves a bool mask and the Triton loss/scheduler kernels run; ``cpu``:
    dropout saves its scaled mask in the input dtype and the PyTorch references run."""

    @property
    def low_precision_params(self) -> bool:
        return self.residual_bytes < FP32

    @property
    def dropout_mask_bytes(self) -> int:
        # CUDA's native_dropout saves a bool mask; the CPU path multiplies by a noise tensor of the
        # input's dtype and saves that.
        return BOOL if self.device == "cuda" else self.compute_bytes


@dataclass(frozen=True)
class Shape:
    """Model dimensions the saved tensors depend on."""

    d_model: int
    n_heads: int
    mlp_ratio: int
    cond_dim: int
    head_hidden: int
    vocab_size: int
    n_layers: int
    dropout: float

    @classmethod
    def from_config(cls, cfg, vocab_size: int) -> "Shape":
        m = cfg.model
        return cls(d_model=m.d_model, n_heads=m.n_heads, mlp_ratio=m.mlp_ratio, cond_dim=m.cond_dim,
                   head_hidden=m.head_mlp_hidden or m.d_model, vocab_size=vocab_size, n_layers=m.n_layers,
                   dropout=m.dropout)


@dataclass(frozen=True)
class Split:
    """How a rank's activations are divided: tensor-parallel size and sequence parallelism."""

    tp: int = 1
    sp: bool = False

    @property
    def seq(self) -> int:
        """Divisor of the tensors that are sequence-sharded (norms, modulate, dropout, residual)."""
        return self.tp if self.sp and self.tp > 1 else 1


@dataclass
class Saved:
    """An itemised byte count: ``items`` maps a label to bytes."""

    items: dict[str, float] = field(default_factory=dict)

    def add(self, label: str, nbytes: float) -> None:
        self.items[label] = self.items.get(label, 0.0) + float(nbytes)

    def extend(self, other: "Saved", times: float = 1.0, prefix: str = "") -> None:
        for label, nbytes in other.items.items():
            self.add(prefix + label, nbytes * times)

    @property
    def total(self) -> float:
        return sum(self.items.values())


def block_saved(rows: int, seq_len: int, s: Shape, num: Numerics, split: Split, *, dropout: float,
                input_saved_by_block: bool = True) -> Saved:
    """One ``DiTBlock`` forward with grad on (rows, seq_len), not checkpointed.

    ``input_saved_by_block``: norm1 saves the block input (as fp32: the input itself when the
    residual is fp32, a fresh fp32 copy otherwise). Always true; the flag exists for clarity.
    """
    out = Saved()
    d, e, tp, q = s.d_model, num.compute_bytes, split.tp, split.seq
    tok = rows * seq_len
    hidden = s.mlp_ratio * d
    # Attention half.
    if input_saved_by_block:
        out.add("norm1 input (fp32)", tok * d * FP32 / q)
    out.add("norm stats (mean, rstd)", 2 * 2 * tok * FP32 / q)
    out.add("norm outputs n1, n2 (fp32, saved by modulate)", 2 * tok * d * FP32 / q)
    out.add("modulation output (shift/scale/gate views) and 1 + scale (x2)", rows * (6 * d + 2 * d) * e)
    # q/k/v save their (gathered) input: one fp32 tensor, or one bf16 cast per projection.
    qkv_in = tok * d * FP32 if e == FP32 else 3 * tok * d * e
    out.add("q/k/v projection input", qkv_in)
    out.add("rotary cos/sin tables", 2 * seq_len * (d // s.n_heads // 2) * FP32)
    out.add("SDPA q, k, v, output", 4 * tok * d * e / tp)
    out.add("SDPA logsumexp", tok * (s.n_heads // tp) * FP32)
    # gate * dropout(x): the mul saves dropout's output (or o_proj's output when p = 0); dropout its mask.
    out.add("gated branch outputs (attn, mlp)", 2 * tok * d * e / q)
    if dropout > 0:
        out.add("dropout masks", 2 * tok * d * num.dropout_mask_bytes / q)
    # MLP half.
    out.add("norm2 input (fp32)", tok * d * FP32 / q)
    out.add("fc1 input", tok * d * e)
    out.add("fc1 output (GELU input), GELU output (fc2 input)", 2 * tok * hidden * e / tp)
    return out


def checkpointed_block_saved(rows: int, seq_len: int, s: Shape, num: Numerics, split: Split) -> Saved:
    """A block under activation checkpointing keeps only its input ``x`` (the conditioning is shared)."""
    out = Saved()
    out.add("checkpointed block input", rows * seq_len * s.d_model * num.residual_bytes / split.seq)
    return out


def conditioning_saved(rows: int, s: Shape, num: Numerics) -> Saved:
    """``backbone.conditioning`` with grad: Linear(256, c) input, SiLU input, Linear(c, c) input, the
    final F.silu's input, and its output c (read by every block's modulation)."""
    out = Saved()
    e = num.compute_bytes
    out.add("conditioning MLP", rows * (SINUSOID_DIM + 4 * s.cond_dim) * e)
    return out


def head_tail_saved(rows: int, seq_len: int, s: Shape, num: Numerics, split: Split) -> Saved:
    """The scheduler head after its block: LayerNorm (input fp32, stats), proj input, GELU input,
    out input."""
    out = Saved()
    tok = rows * seq_len
    d, e, h = s.d_model, num.compute_bytes, s.head_hidden
    out.add("head norm input (fp32) and stats", tok * (d + 2) * FP32)
    out.add("head proj input", tok * d * e)
    out.add("head GELU input and output", 2 * tok * h * e / split.tp)
    return out


# The scheduler kernels save a fixed number of (B, L) and (B,) tensors (read off their code):
# reference (PyTorch, CPU): sigmoid output, weights, NormSig's centring, k, clamp and where masks,
# x = k log t, expm1/log1p branches of log(1 - t^k) ... ; Triton (CUDA): g, valid, masks, per-row
# log t, 1/t and the mean. Per token: (fp32 tensors, bool tensors), per row: bytes.
# NormSig's centring (``normsig_input``) adds one fp32 (B, L) weight and one fp32 (B,) divisor. The
# bool per token includes the validity mask passed in (``valid`` for phi, all-True for psi).
_SCHED_REF_WITH_MASKS = (9, 4, 4 * FP32)      # + K bool masks per token
_SCHED_REF_NO_MASKS = (5, 1, 4 * FP32)
_SCHED_TRITON = (2, 1, 3 * 8 + FP32)           # + K masks per token when given


def schedule_saved(rows: int, seq_len: int, num: Numerics, num_masks: int) -> Saved:
    """``LoMDMScheduler.exponents`` with grad (after the centred NormSig input), ``num_masks`` 0 for
    the psi head (no log q)."""
    out = Saved()
    tok = rows * seq_len
    if num.device == "cuda":
        f32, bools, per_row = _SCHED_TRITON
    else:
        f32, bools, per_row = _SCHED_REF_WITH_MASKS if num_masks else _SCHED_REF_NO_MASKS
    out.add("scheduler kernel", tok * (f32 * FP32 + bools * BOOL + num_masks * BOOL) + rows * per_row)
    return out


# Per loss row, beside the logits: reference: logsumexp output, gather index (int64), 16 fp32
# intermediates of the velocity term (Horner series of excess_log_ratio, where-branches) and one
# bool; Triton: targets (int64), A, A_hat, lse, nll (fp32) and the active mask.
_LOSS_REF_PER_ROW = 18 * FP32 + INT64 + BOOL
_LOSS_TRITON_PER_ROW = INT64 + 4 * FP32 + BOOL


def output_saved(copies: int, seq_len: int, masked: float, s: Shape, num: Numerics, split: Split) -> Saved:
    """Output layer and token loss on the ``masked`` positions of ``copies`` masked rows.

    ``h[loss_positions]`` saves the (copies, L) bool mask; ``c[row_of_token]`` its int64 index
    (a view of nonzero's (N, 2) result); FinalLayer saves the gathered c, the norm input (fp32) and
    stats, the normed h and 1 + scale (both per position), the Linear's input; the loss saves the
    logits as fp32 (reference: the filled fp32 copy) or in their dtype (Triton), over V / tp
    columns (vocab-parallel).
    """
    out = Saved()
    d, e, c, V, tp = s.d_model, num.compute_bytes, s.cond_dim, s.vocab_size, split.tp
    n = masked
    out.add("masked-position gather (bool mask, int64 index)", copies * seq_len * BOOL + n * 2 * INT64)
    final = n * (c * e + (d + 2) * FP32 + d * FP32 + d * e + d * e)
    out.add("final layer (gathered c, norm, modulate, linear input)", final)
    if num.device == "cuda":
        out.add("logits saved by the loss", n * V / tp * e)
        out.add("loss per-row tensors", n * _LOSS_TRITON_PER_ROW)
    else:
        out.add("logits saved by the loss", n * V / tp * FP32)
        out.add("loss per-row tensors", n * _LOSS_REF_PER_ROW + INT64)
    return out


def _blocks(n_blocks: int, first_index: int, rows: int, seq_len: int, s: Shape, num: Numerics, split: Split,
            ac: str) -> Saved:
    """``n_blocks`` consecutive backbone blocks starting at ``first_index`` (selective checkpointing
    picks the even indices, as ``apply_activation_checkpointing`` does)."""
    out = Saved()
    full = block_saved(rows, seq_len, s, num, split, dropout=s.dropout)
    ckpt = checkpointed_block_saved(rows, seq_len, s, num, split)
    for index in range(first_index, first_index + n_blocks):
        checkpointed = ac == "full" or (ac == "selective" and index % 2 == 0)
        out.extend(ckpt if checkpointed else full, prefix="backbone block: ")
    return out


def _head(rows: int, seq_len: int, s: Shape, num: Numerics, split: Split, ac: str, name: str) -> Saved:
    out = Saved()
    if ac == "full":
        # The head block's input is the detached backbone feature; its storage is saved by the
        # checkpoint (whole rows: the head scatters the sequence inside the block).
        out.add(f"{name} head block input (checkpointed)", rows * seq_len * s.d_model * num.residual_bytes)
    else:
        out.extend(block_saved(rows, seq_len, s, num, Split(split.tp, False), dropout=0.0), prefix=f"{name} head block: ")
    out.extend(head_tail_saved(rows, seq_len, s, num, split), prefix=f"{name} head: ")
    return out


def step_saved(*, rows: int, seq_len: int, num_masks: int, masked_fraction: float, learned: bool, s: Shape,
               num: Numerics, split: Split = Split(), ac: str = "none") -> Saved:
    """Bytes saved for backward by ``diffusion_loss`` on ``rows`` rows in one process (no pipeline).

    ``masked_fraction``: share of the K x rows x L positions that are masked (the logits are
    computed there only).
    """
    out = Saved()
    K = num_masks
    copies = K * rows
    if learned:
        out.extend(conditioning_saved(rows, s, num), prefix="clean pass: ")
        out.extend(_head(rows, seq_len, s, num, split, ac, "phi"))
        out.extend(schedule_saved(rows, seq_len, num, K), prefix="phi ")
    out.extend(conditioning_saved(copies, s, num), prefix="masked pass: ")
    out.add("embedding token ids", copies * seq_len * INT64)
    out.extend(_blocks(s.n_layers, 0, copies, seq_len, s, num, split, ac))
    out.extend(output_saved(copies, seq_len, masked_fraction * copies * seq_len, s, num, split))
    if learned:
        out.extend(_head(copies, seq_len, s, num, split, ac, "psi"))
        out.extend(schedule_saved(copies, seq_len, num, 0), prefix="psi ")
        out.add("psi statistics index mask (valid.repeat(K, 1))", copies * seq_len * BOOL)
    return out


def pipeline_in_flight(schedule: str, pp: int, microbatches: int, virtual_stages: int, pp_rank: int) -> float:
    """Microbatch forwards a pipeline rank holds before its first backward, in units of the rank's
    whole depth.

    1F1B: rank r runs pp - r warm-up forwards (capped by the microbatch count); GPipe: every
    microbatch; interleaved 1F1B: torch's warm-up of (v - 1) pp + 2 (pp - 1 - r) + 1 chunk
    forwards, each chunk 1 / v of the rank's blocks.
    """
    if pp == 1:
        return 1.0
    if schedule == "gpipe":
        return float(microbatches)
    if schedule == "interleaved_1f1b":
        v = virtual_stages
        chunks = min(microbatches * v, (v - 1) * pp + 2 * (pp - 1 - pp_rank) + 1)
        return chunks / v
    return float(min(microbatches, pp - pp_rank))
