"""The capacity plan of a config on a cluster: parameters, FLOPs, memory per GPU, the largest
per-GPU batch that fits, step time and tokens per day at a given MFU.

Everything is a formula over the config (no model is built), so it answers for any size at once.
Parameters: ``params.py``; FLOPs: ``lomdm_dist.parallel.flops`` (docs/mfu.md); saved activations:
``activations.py``; model state and transients: ``memory.py``; docs/planning.md has the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config.errors import ConfigError
from ..config.schema import Config
from ..parallel.config import ParallelConfig
from ..parallel.flops import PEAK_FLOPS, StepFlops, config_step_flops
from ..parallel.layout import validate_layout
from . import activations as act
from .activations import FP32, INT64, Numerics, Saved, Shape, Split
from .memory import GiB, model_state_bytes, stage_params, transient_bytes
from .params import ParamCount, count_parameters


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: float
    """Device memory as CUDA reports it (``torch.cuda.get_device_properties().total_memory``)."""
    peak_flops: float
    """Dense bf16 tensor-core peak (``parallel.flops.PEAK_FLOPS``)."""


GPUS = {
    "h100": GpuSpec("H100 SXM 80GB", 81_559 * 2 ** 20, PEAK_FLOPS["h100-sxm-bf16"]),
    "h200": GpuSpec("H200 141GB", 143_771 * 2 ** 20, PEAK_FLOPS["h200-bf16"]),
}

DEFAULT_RESERVE_GIB = 6.0
"""Memory kept free per GPU for what the model does not allocate: the CUDA context and kernels
(about 0.5-1 GiB), NCCL's communication buffers (about 1-2 GiB on 64+ ranks) and the caching
allocator's fragmentation. A safety margin, not a derived number (``--reserve-gib``)."""


def resolve_vocab_size(cfg: Config) -> int:
    """The model's vocabulary: the tokenizer's plus the mask token (as the trainer builds it)."""
    from data_pipeline.errors import DataError
    from data_pipeline.tokenizers import get_tokenizer

    try:
        return get_tokenizer(cfg.data.tokenizer).vocab_size + 1
    except (DataError, OSError, ValueError) as err:
        raise ConfigError(f"data.tokenizer: cannot load '{cfg.data.tokenizer}' to read the vocabulary size "
                          f"({err}); pass --vocab-size") from None


def expected_masked_fraction(cfg: Config, points: int = 4096) -> float:
    """E[share of positions masked] under the config's time sampling, for a fresh model (every
    LoMDM exponent at c1): the mean of P(masked | t) over t drawn by the trainer's own sampler at
    ``points`` evenly spaced quantiles (inverse-CDF quadrature)."""
    from ..diffusion.schedulers import build_scheduler
    from ..diffusion.time_sampling import build_time_sampler

    d = cfg.diffusion
    u = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    times = build_time_sampler(d).draw(u)
    if d.scheduler == "lomdm":
        p = torch.exp(d.c1 * times.log_t)
    else:
        p = torch.exp(build_scheduler(d).schedule(times.t, cfg.data.seq_len).log_masked.double())
    return float(p.mean())


def numerics_for(cfg: Config, *, dp: int, device: str = "cuda") -> Numerics:
    """The trainer's dtypes: bf16 autocast unless ``train.precision`` is fp32 (``auto`` is bf16 on
    CUDA, fp32 on CPU); FSDP (data parallel > 1) gathers parameters in the autocast dtype."""
    precision = cfg.train.precision
    bf16 = precision == "bf16" or (precision == "auto" and device == "cuda")
    e = 2 if bf16 else FP32
    return Numerics(compute_bytes=e, residual_bytes=e if dp > 1 else FP32, device=device)


@dataclass
class RankMemory:
    """Memory of one GPU, itemised."""

    role: str
    state: dict[str, float]
    activations: Saved
    transient: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.state.values()) + self.activations.total + sum(self.transient.values())


def _pipeline_rank_saved(*, rows: int, seq_len: int, K: int, m: float, learned: bool, s: Shape, num: Numerics,
                         split: Split, par: ParallelConfig, first: bool) -> tuple[Saved, float, int]:
    """Saved bytes of the first or last pipeline rank, the bytes of its largest recomputed block,
    and its microbatch rows; ``par`` is resolved. The clean pass runs without grad; the last
    stage keeps the clean features of all its rows for the phi head of the masked pass."""
    micro = par.microbatches
    b = rows // micro
    copies = K * b
    blocks_per_rank = s.n_layers // par.pp
    rank = 0 if first else par.pp - 1
    in_flight = act.pipeline_in_flight(par.pipeline_schedule, par.pp, micro, par.virtual_stages, rank)
    one = Saved()
    ac = par.activation_checkpointing
    if first:
        one.extend(act.conditioning_saved(copies, s, num), prefix="masked pass: ")
        one.add("embedding token ids", copies * seq_len * INT64)
        one.extend(act._blocks(blocks_per_rank, 0, copies, seq_len, s, num, split, ac))
    else:
        one.extend(act._blocks(blocks_per_rank, s.n_layers - blocks_per_rank, copies, seq_len, s, num, split, ac))
        one.extend(act.output_saved(copies, seq_len, m * copies * seq_len, s, num, split))
        if learned:
            one.extend(act._head(b, seq_len, s, num, split, ac, "phi"))
            one.extend(act.schedule_saved(b, seq_len, num, K), prefix="phi ")
            one.extend(act._head(copies, seq_len, s, num, split, ac, "psi"))
            one.extend(act.schedule_saved(copies, seq_len, num, 0), prefix="psi ")
            one.add("psi statistics index mask (valid.repeat(K, 1))", copies * seq_len * act.BOOL)
    out = Saved()
    out.extend(one, times=in_flight)
    if learned and not first:
        out.add("clean features kept for the phi head (all local rows)",
                rows * seq_len * s.d_model * num.residual_bytes + rows * s.cond_dim * num.compute_bytes)
    recompute = act.block_saved(copies, seq_len, s, num, split, dropout=s.dropout).total
    return out, recompute, copies


def rank_memory(cfg: Config, params: ParamCount, *, rows: int, masked_fraction: float, num: Numerics,
                par: ParallelConfig, vocab_size: int) -> list[RankMemory]:
    """Memory of the GPUs that bound the layout: the only kind without a pipeline, else the first
    and the last pipeline rank. ``rows``: rows per data-parallel rank; ``par`` resolved."""
    s = Shape.from_config(cfg, vocab_size)
    split = Split(par.tp, par.sequence_parallel and par.tp > 1)
    K = cfg.diffusion.resolved_masks_per_row()
    learned = cfg.diffusion.scheduler == "lomdm"
    L = cfg.data.seq_len
    ac = par.activation_checkpointing
    result = []
    roles = [("every rank", True, True)] if par.pp == 1 else [("first pipeline rank", True, False),
                                                              ("last pipeline rank", False, True)]
    for role, first, last in roles:
        stage = stage_params(params, split, pp=par.pp, first=first, last=last)
        state = model_state_bytes(stage, dp_shard=par.dp_shard, dp=par.dp, pp=par.pp, num=num)
        if par.pp == 1:
            saved = act.step_saved(rows=rows, seq_len=L, num_masks=K, masked_fraction=masked_fraction,
                                   learned=learned, s=s, num=num, split=split, ac=ac)
            copies = K * rows
            recompute = act.block_saved(copies, L, s, num, split, dropout=s.dropout).total
            masked_tokens = masked_fraction * copies * L
        else:
            saved, recompute, copies = _pipeline_rank_saved(rows=rows, seq_len=L, K=K, m=masked_fraction,
                                                            learned=learned, s=s, num=num, split=split, par=par,
                                                            first=first)
            masked_tokens = masked_fraction * copies * L if last else 0.0
        transient = transient_bytes(masked_tokens=masked_tokens, rows=copies, seq_len=L, s=s, num=num,
                                    split=split, ac=ac, recompute_block=recompute)
        result.append(RankMemory(role, state, saved, transient))
    return result


@dataclass
class Plan:
    """A config on a cluster; ``as_dict`` is the JSON the CLI writes."""

    config: str
    nodes: int
    gpus_per_node: int
    gpu: GpuSpec
    mfu: float
    parallel: ParallelConfig
    vocab_size: int
    params: ParamCount
    masked_fraction: float
    flops: StepFlops
    local_rows: int
    ranks: list[RankMemory]
    usable_bytes: float
    max_local_rows: int
    global_batch: int
    seq_len: int
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def peak_rank(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)

    @property
    def memory_bytes(self) -> float:
        return self.peak_rank.total

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.usable_bytes

    @property
    def step_seconds(self) -> float:
        return self.flops.total / (self.world_size * self.gpu.peak_flops * self.mfu)

    @property
    def tokens_per_day(self) -> float:
        return self.global_batch * self.seq_len * 86_400 / self.step_seconds

    @property
    def pipeline_bubble(self) -> float:
        """Idle share of a 1F1B pipeline, (pp - 1) / (microbatches + pp - 1); the masked pass only
        (the clean pass adds its own fill and drain)."""
        p = self.parallel
        if p.pp == 1:
            return 0.0
        m = p.microbatches * (p.virtual_stages if p.pipeline_schedule == "interleaved_1f1b" else 1)
        return (p.pp - 1) / (m + p.pp - 1)

    def as_dict(self) -> dict:
        p = self.parallel
        peak = self.peak_rank
        return {
            "config": self.config,
            "cluster": {"nodes": self.nodes, "gpus_per_node": self.gpus_per_node, "gpu": self.gpu.name,
                        "gpu_memory_bytes": self.gpu.memory_bytes, "peak_flops": self.gpu.peak_flops},
            "layout": {"tp": p.tp, "pp": p.pp, "dp_shard": p.dp_shard, "dp_replicate": p.dp_replicate,
                       "sequence_parallel": p.sequence_parallel, "microbatches": p.microbatches,
                       "activation_checkpointing": p.activation_checkpointing,
                       "pipeline_schedule": p.pipeline_schedule},
            "vocab_size": self.vocab_size,
            "parameters": self.params.as_dict(),
            "masked_fraction": self.masked_fraction,
            "flops_per_step": {"clean_pass": self.flops.clean_pass, "phi_head": self.flops.phi_head,
                               "masked_passes": self.flops.masked_pass, "psi_head": self.flops.psi_head,
                               "output_layer": self.flops.output_layer, "total": self.flops.total},
            "global_batch_rows": self.global_batch,
            "local_rows": self.local_rows,
            "memory_per_gpu": {
                r.role: {"state": r.state, "activations": r.activations.items, "activations_total": r.activations.total,
                         "transient": r.transient, "total": r.total} for r in self.ranks},
            "peak_rank": peak.role,
            "peak_bytes": self.memory_bytes,
            "usable_bytes": self.usable_bytes,
            "fits": self.fits,
            "headroom_bytes": self.usable_bytes - self.memory_bytes,
            "max_local_rows": self.max_local_rows,
            "mfu": self.mfu,
            "step_seconds": self.step_seconds,
            "tokens_per_day": self.tokens_per_day,
            "pipeline_bubble": self.pipeline_bubble,
            "notes": self.notes,
        }


def _max_rows(memory_at, usable: float, step: int, cap: int = 1 << 20) -> int:
    """Largest multiple of ``step`` rows whose memory fits (memory grows with rows); 0 if none."""
    if memory_at(step) > usable:
        return 0
    lo, hi = 1, 2
    while hi * step <= cap and memory_at(hi * step) <= usable:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if memory_at(mid * step) <= usable:
            lo = mid
        else:
            hi = mid
    return lo * step


def make_plan(cfg: Config, *, nodes: int, gpus_per_node: int, gpu: str = "h100", mfu: float = 0.4,
              vocab_size: int | None = None, reserve_gib: float = DEFAULT_RESERVE_GIB, config_name: str = "",
              device: str = "cuda") -> Plan:
    """Plan ``cfg`` on ``nodes`` x ``gpus_per_node`` GPUs of kind ``gpu``. Raises ``ConfigError``
    (naming the key) when the layout does not match the cluster, the model or the batch."""
    if gpu not in GPUS:
        raise ConfigError(f"--gpu must be one of {', '.join(GPUS)}, got {gpu!r}")
    if not 0.0 < mfu <= 1.0:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be positive, got {nodes} and {gpus_per_node}")
    spec = GPUS[gpu]
    par = validate_layout(cfg, nodes * gpus_per_node)
    if vocab_size is None:
        vocab_size = resolve_vocab_size(cfg)
    params = count_parameters(cfg.model, cfg.diffusion, vocab_size)
    m = expected_masked_fraction(cfg)
    flops = config_step_flops(cfg, vocab_size=vocab_size, rows=cfg.data.batch_size, masked_fraction=m)
    num = numerics_for(cfg, dp=par.dp, device=device)
    local_rows = cfg.data.batch_size // par.dp
    usable = spec.memory_bytes - reserve_gib * GiB

    def ranks_at(rows: int) -> list[RankMemory]:
        return rank_memory(cfg, params, rows=rows, masked_fraction=m, num=num, par=par, vocab_size=vocab_size)

    ranks = ranks_at(local_rows)
    step = par.microbatches if par.pp > 1 else 1
    max_rows = _max_rows(lambda r: max(x.total for x in ranks_at(r)), usable, step)
    notes = []
    if par.pp > 1:
        notes.append(f"pipeline: {par.microbatches} microbatches of {local_rows // par.microbatches} rows "
                     f"({cfg.diffusion.resolved_masks_per_row()} masked copies each); 1F1B idle share "
                     f"{(par.pp - 1) / (par.microbatches + par.pp - 1):.0%} of the masked pass, plus the "
                     "clean pass's fill and drain")
    return Plan(config=config_name, nodes=nodes, gpus_per_node=gpus_per_node, gpu=spec, mfu=mfu, parallel=par,
                vocab_size=vocab_size, params=params, masked_fraction=m, flops=flops, local_rows=local_rows,
                ranks=ranks, usable_bytes=usable, max_local_rows=max_rows, global_batch=cfg.data.batch_size,
                seq_len=cfg.data.seq_len, notes=notes)


def _num(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def format_plan(plan: Plan) -> str:
    """The table the CLI prints."""
    p, pc, f = plan.parallel, plan.params, plan.flops
    rows: list[tuple[str, str]] = []
    rows.append(("cluster", f"{plan.nodes} x {plan.gpus_per_node} {plan.gpu.name} = {plan.world_size} GPUs"))
    rows.append(("layout", f"tp {p.tp}{' +sp' if p.sequence_parallel and p.tp > 1 else ''}, pp {p.pp}"
                 + (f" ({p.microbatches} microbatches, {p.pipeline_schedule})" if p.pp > 1 else "")
                 + f", dp_shard {p.dp_shard}, dp_replicate {p.dp_replicate}, checkpointing {p.activation_checkpointing}"))
    rows.append(("parameters", f"{pc.total / 1e9:.3f} B = backbone {pc.backbone.total / 1e9:.3f} B "
                 f"(blocks {pc.blocks.total / 1e9:.3f}, embedding + output {(pc.embedding.total + pc.output.total) / 1e9:.3f}) "
                 f"+ heads {pc.heads.total / 1e9:.3f} B; vocabulary {plan.vocab_size:,}"))
    rows.append(("FLOPs / step", f"{f.total / 1e15:.3f} PFLOP: clean pass {f.clean_pass / 1e15:.3f}, masked passes "
                 f"{f.masked_pass / 1e15:.3f}, heads {(f.phi_head + f.psi_head) / 1e15:.3f}, output layer "
                 f"{f.output_layer / 1e15:.3f} (masked fraction {plan.masked_fraction:.3f})"))
    for r in plan.ranks:
        state = sum(r.state.values())
        rows.append((f"memory ({r.role})",
                     f"{r.total / GiB:.1f} GiB = state {state / GiB:.1f} + activations {r.activations.total / GiB:.1f}"
                     f" + transient {sum(r.transient.values()) / GiB:.1f}"))
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    rows.append(("per-GPU budget", f"{plan.usable_bytes / GiB:.1f} GiB usable: {verdict} "
                 f"({abs(plan.usable_bytes - plan.memory_bytes) / GiB:.1f} GiB "
                 f"{'to spare' if plan.fits else 'over'})"))
    rows.append(("batch per GPU", f"{plan.local_rows} rows now; at most {plan.max_local_rows} rows fit"))
    rows.append((f"at MFU {plan.mfu:.0%}", f"{plan.step_seconds:.2f} s / step, {_num(plan.tokens_per_day)} tokens / day "
                 f"({plan.global_batch} x {plan.seq_len} tokens per step)"))
    if p.pp > 1:
        rows.append(("pipeline bubble", f"{plan.pipeline_bubble:.0%} of the masked pass idle (1F1B)"))
    width = max(len(k) for k, _ in rows)
    lines = [f"plan: {plan.config}" if plan.config else "plan"]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)

