"""Pipeline parallelism with ``torch.distributed.pipelining`` and the two-phase LoMDM step.

Split: the DiT blocks are cut into ``num_stages`` stages of equal depth; stage 0 also holds the
embedding and the conditioning MLP, the last stage the output layer and the phi/psi heads. Stage
s lives on pipeline rank ``s % pp`` (the looped assignment interleaved schedules expect). A rank
keeps only its own parts: blocks of other stages are replaced by :class:`PipelineHole` so that
indices and parameter names stay those of the full model (checkpoints, EMA and optimizer state
are keyed by name and must not depend on the layout).

Between stages travel the hidden states ``h`` and the adaLN conditioning ``c`` (c is made at
stage 0 and every block reads it; its gradient flows back to the conditioning MLP).

The LoMDM step cannot be one pipeline pass, because the masks of the with-grad pass depend on
the phi head at the last stage, computed from the clean rows. So (``design.md``):

1. a forward-only pass (no grad) over all microbatches of the clean rows; the last stage keeps the
   clean features and conditioning, detached, and computes the exponents k_phi;
2. k_phi goes back to the first stage (a broadcast over the pipeline group; every stage then draws
   the same masks from k_phi and the counter-based uniforms, which need no communication);
3. a 1F1B (or GPipe / interleaved 1F1B) pass over the masked microbatches; the loss function at
   the last stage re-applies the phi head *with grad* to the stored clean features of the
   microbatch's rows, runs the psi head and the vocab-parallel loss, and returns the microbatch's
   share of the surrogate (summed, divided by the global token count, so the schedule must not
   rescale gradients).

Fixed schedulers (mdlm, poly, arm, block) skip phases 1 and 2.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..config import DiffusionConfig
from ..diffusion.objective import (LossOutput, PassLoss, assemble_loss, conditioning_sigma, draw_exponents,
                                   draw_masks, masked_copies, masked_pass_loss, step_randomness)
from ..diffusion.schedulers import Scheduler
from ..model import DiTBlock
from .config import ParallelConfig
from .mesh import sum_over_dp
from .loss import VocabParallel, token_loss_for


class PipelineHole(nn.Module):
    """Stands in for a DiT block that lives on another pipeline stage (no parameters)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        raise RuntimeError(f"block {self.index} lives on another pipeline stage")

    def extra_repr(self) -> str:
        return f"block {self.index} on another stage"


def stage_blocks(n_layers: int, num_stages: int, stage: int) -> range:
    """Indices of the blocks of ``stage`` (equal depth; the layout check guarantees divisibility)."""
    per_stage = n_layers // num_stages
    return range(stage * per_stage, (stage + 1) * per_stage)


def rank_stages(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """Stages held by pipeline rank ``pp_rank``: pp_rank, pp_rank + pp, ... (looped assignment)."""
    return [pp_rank + v * pp for v in range(virtual_stages)]


def keep_stage_parts(model: nn.Module, stages: list[int], num_stages: int) -> None:
    """Drop from ``model`` (in place) every part that belongs to other stages' ranks."""
    backbone = model.backbone
    owned = {i for s in stages for i in stage_blocks(len(backbone.blocks), num_stages, s)}
    for index in range(len(backbone.blocks)):
        if index not in owned:
            backbone.blocks[index] = PipelineHole(index)
    if 0 not in stages:
        backbone.embed = None
        backbone.sigma_map = None
    if num_stages - 1 not in stages:
        backbone.final = None
        model.phi = None
        model.psi = None


class StageModule(nn.Module):
    """One pipeline stage: (tokens, sigma) -> (h, c) at stage 0, (h, c) -> (h, c) after it.

    Registers only the parts the stage runs (so a rank's stages never share parameters); the
    backbone itself is held as a plain reference for its ``conditioning`` method.
    """

    def __init__(self, model: nn.Module, stage: int, num_stages: int) -> None:
        super().__init__()
        backbone = model.backbone
        self.__dict__["backbone"] = backbone
        self.stage, self.num_stages = stage, num_stages
        self.is_first = stage == 0
        ids = stage_blocks(len(backbone.blocks), num_stages, stage)
        blocks = [backbone.blocks[i] for i in ids]
        if not all(isinstance(b, DiTBlock) for b in blocks):
            raise ValueError(f"stage {stage} needs blocks {list(ids)}, which this rank does not hold")
        self.blocks = nn.ModuleList(blocks)
        if self.is_first:
            self.embed = backbone.embed
            self.sigma_map = backbone.sigma_map

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        backbone = self.backbone
        if self.is_first:
            tokens, sigma = inputs
            c = backbone.conditioning(tokens.shape[0], sigma if backbone.time_conditioning else None)
            h = backbone.embed(tokens)
        else:
            h, c = inputs
        for block in self.blocks:
            h = block(h, c)
        return h, c


def completed(tensor: Tensor) -> Tensor:
    """``tensor`` with its pending functional collective (if any) waited for.

    A tensor-parallel module's output can be an ``AsyncCollectiveTensor`` whose all-reduce or
    reduce-scatter is waited for only when an operation reads its values. Metadata (dtype, shape)
    does not count, so a tensor inspected only for its metadata would leave its collective
    registered until the process ends, and c10d warns about it at exit.
    """
    return tensor.wait() if isinstance(tensor, AsyncCollectiveTensor) else tensor


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_STAT_KEYS_LEARNED = ("k_phi_mean", "k_phi_std", "k_phi_saturated", "k_hat_mean", "k_hat_std", "k_hat_saturated",
                      "g_phi_mean")
_STAT_KEYS = ("masked_fraction", "t_mean")


def _pack(out: LossOutput, learned: bool) -> Tensor:
    keys = (_STAT_KEYS_LEARNED if learned else ()) + _STAT_KEYS
    head = [out.loss, out.nelbo, out.l_main, out.l_velocity] + [out.stats[k] for k in keys]
    return torch.cat([torch.stack([v.detach().double().reshape(()) for v in head]), out.row_nelbo.double()])


def _unpack(vector: Tensor, learned: bool, tokens: Tensor) -> LossOutput:
    keys = (_STAT_KEYS_LEARNED if learned else ()) + _STAT_KEYS
    n = 4 + len(keys)
    head = vector[:n]
    return LossOutput(loss=head[0].float(), nelbo=head[1].float(), l_main=head[2].float(),
                      l_velocity=head[3].float(), row_nelbo=vector[n:].clone(), tokens=tokens,
                      stats={k: head[4 + i].float() for i, k in enumerate(keys)})


class PipelineRunner:
    """Runs the two-phase step over the stages this rank holds."""

    def __init__(self, model: nn.Module, mesh: DeviceMesh, parallel: ParallelConfig, device: torch.device,
                 vocab_parallel: VocabParallel | None) -> None:
        self.model = model
        self.mesh = mesh
        self.parallel = parallel
        self.device = device
        self.token_loss = token_loss_for(vocab_parallel)
        self.group = mesh["pp"].get_group()
        self.pp_rank = mesh["pp"].get_local_rank()
        self.pp = parallel.pp
        self.num_stages = parallel.num_stages
        self.stages = rank_stages(self.pp_rank, self.pp, parallel.virtual_stages)
        self.stage_modules = [StageModule(model, s, self.num_stages) for s in self.stages]
        self.has_first = 0 in self.stages
        self.has_last = self.num_stages - 1 in self.stages
        self.last_rank = dist.get_global_rank(self.group, (self.num_stages - 1) % self.pp)
        self.first_rank = dist.get_global_rank(self.group, 0)
        self.sequence_shards = parallel.tp if parallel.sequence_parallel and parallel.tp > 1 else 1
        self._schedules: dict[tuple, object] = {}
        self._dtypes: dict[tuple, tuple[torch.dtype, torch.dtype]] = {}
        self._context: dict | None = None
        self._parts: dict[int, PassLoss] = {}

    # ------------------------------------------------------------------ schedules
    def _activation_dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """dtypes of (h, c) between stages, probed at stage 0 on one token and shared over the group.

        They depend on the mixed-precision setup (FSDP parameter dtype, autocast), which every
        stage must know before the first microbatch: the stages are built with static shapes so
        that no stage ever runs on placeholder tensors.
        """
        key = torch.is_autocast_enabled(self.device.type), torch.get_autocast_dtype(self.device.type)
        if key not in self._dtypes:
            codes = torch.zeros(2, dtype=torch.int64, device=self.device)
            if self.has_first:
                backbone = self.model.backbone
                with torch.no_grad():
                    probe = torch.zeros(1, self.sequence_shards, dtype=torch.int64, device=self.device)
                    h = completed(backbone.embed(probe))
                    c = completed(backbone.conditioning(1, torch.zeros(1, device=self.device)))
                codes[0], codes[1] = _DTYPES.index(h.dtype), _DTYPES.index(c.dtype)
            dist.broadcast(codes, src=self.first_rank, group=self.group)
            self._dtypes[key] = (_DTYPES[int(codes[0])], _DTYPES[int(codes[1])])
        return self._dtypes[key]

    def _build_stages(self, rows: int, seq_len: int) -> list[PipelineStage]:
        """Stages with static activation metadata for microbatches of ``rows`` rows."""
        h_dtype, c_dtype = self._activation_dtypes()
        backbone = self.model.backbone
        d_model, cond_dim = backbone.d_model, backbone.cond_dim
        inner_len = seq_len // self.sequence_shards

        def meta(*shape, dtype, grad=True):
            # Activations carry gradients between stages; the token ids and sigma of stage 0 do not.
            return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)

        stages = []
        for module, stage in zip(self.stage_modules, self.stages):
            if stage == 0:
                inputs = (meta(rows, seq_len, dtype=torch.int64, grad=False), meta(rows, dtype=torch.float32, grad=False))
            else:
                inputs = (meta(rows, inner_len, d_model, dtype=h_dtype), meta(rows, cond_dim, dtype=c_dtype))
            out_len = seq_len if stage == self.num_stages - 1 else inner_len
            outputs = (meta(rows, out_len, d_model, dtype=h_dtype), meta(rows, cond_dim, dtype=c_dtype))
            stages.append(PipelineStage(module, stage, self.num_stages, self.device, input_args=inputs,
                                        output_args=outputs, group=self.group))
        return stages

    def _schedule(self, kind: str, shape: tuple[int, int], loss_fn: Callable | None):
        """A schedule per (kind, batch shape, dtypes): stages fix their activation shapes."""
        key = (kind, shape, self._activation_dtypes())
        if key not in self._schedules:
            micro = self.parallel.microbatches
            stages = self._build_stages(shape[0] // micro, shape[1])
            name = self.parallel.pipeline_schedule
            if name == "interleaved_1f1b":
                schedule = ScheduleInterleaved1F1B(stages, micro, loss_fn=loss_fn, scale_grads=False)
            elif name == "1f1b" and loss_fn is not None:
                schedule = Schedule1F1B(stages[0], micro, loss_fn=loss_fn, scale_grads=False)
            else:
                schedule = ScheduleGPipe(stages[0], micro, loss_fn=loss_fn, scale_grads=False)
            self._schedules[key] = schedule
        return self._schedules[key]

    def _forward_only(self, kind: str, tokens: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor] | None:
        """Forward pass of every microbatch without grad; (h, c) merged at the last stage, else None."""
        schedule = self._schedule(kind, (tokens.shape[0], tokens.shape[1]), None)
        with torch.no_grad():
            if self.has_first:
                out = schedule.step(tokens, sigma)
            else:
                out = schedule.step()
        if not self.has_last:
            return None
        h, c = out
        return h.detach(), c.detach()

    # ------------------------------------------------------------------ the step
    def _microbatch_loss(self, output: tuple[Tensor, Tensor], target: Tensor) -> Tensor:
        """Loss function at the last stage; ``target`` holds the local row indices of the microbatch."""
        ctx = self._context
        h, c = output
        b = ctx["rows_per_microbatch"]
        index = int(target[0]) // b
        rows = slice(index * b, (index + 1) * b)
        clean = ctx["h_clean"] is not None
        part = masked_pass_loss(
            self.model, ctx["scheduler"], h=h, c=c, x=ctx["x"][rows], valid=ctx["valid"][rows],
            masks=ctx["masks"][:, rows], times=ctx["times"][rows], cfg=ctx["cfg"],
            h_clean=ctx["h_clean"][rows] if clean else None, c_clean=ctx["c_clean"][rows] if clean else None,
            token_loss=self.token_loss)
        self._parts[index] = part
        return part.surrogate.sum() / ctx["normalizer"]

    def run(self, scheduler: Scheduler, x: Tensor, *, cfg: DiffusionConfig, seed: int, step: int, rows: Tensor,
            global_batch: int, valid: Tensor, num_masks: int, normalizer: Tensor, time_stream: int,
            mask_stream: int, backward: bool) -> LossOutput:
        """One step on this rank's rows ``x`` (B, L): every pipeline rank passes the same rows.

        With ``backward`` the parameter gradients are accumulated; the returned ``LossOutput``
        (same on every rank of the pipeline group) holds detached values.
        """
        model = self.model
        backbone = model.backbone
        micro = self.parallel.microbatches
        B, L = x.shape
        if B % micro:
            raise ValueError(f"the local batch ({B} rows) is not divisible by parallel.microbatches ({micro})")
        b = B // micro
        K = num_masks
        times, uniforms = step_randomness(seed=seed, step=step, rows=rows.to(x.device), global_batch=global_batch,
                                          seq_len=L, num_masks=K, cfg=cfg, time_stream=time_stream,
                                          mask_stream=mask_stream)
        t = times.t.to(torch.float32)

        h_clean = c_clean = k_draw = None
        if scheduler.learned:
            sigma_clean = conditioning_sigma(backbone, torch.zeros_like(t))
            clean = self._forward_only("clean", x, sigma_clean)
            k_draw = torch.empty(B, L, dtype=torch.float32, device=x.device)
            if clean is not None:
                h_clean, c_clean = clean
                with torch.no_grad():
                    k_draw = draw_exponents(scheduler, model.phi(h_clean, c_clean).float(), times.t, valid)
            dist.broadcast(k_draw, src=self.last_rank, group=self.group)
        masks = draw_masks(scheduler, times, uniforms, k_draw)

        chunks = [slice(i * b, (i + 1) * b) for i in range(micro)]
        z = torch.cat([masked_copies(x[s], masks[:, s], model.mask_token_id) for s in chunks])
        sigma = torch.cat([conditioning_sigma(backbone, t[s].repeat(K)) for s in chunks])
        self._context = dict(scheduler=scheduler, cfg=cfg, x=x, valid=valid, masks=masks, times=times,
                             h_clean=h_clean, c_clean=c_clean, normalizer=normalizer, rows_per_microbatch=b)
        self._parts = {}
        try:
            if backward:
                schedule = self._schedule("masked", (z.shape[0], z.shape[1]), self._microbatch_loss)
                target = torch.arange(B)
                args = (z, sigma) if self.has_first else ()
                schedule.step(*args, target=target if self.has_last else None, return_outputs=False)
            else:
                out = self._forward_only("masked-eval", z, sigma)
                if out is not None:
                    h, c = out
                    with torch.no_grad():
                        for i, s in enumerate(chunks):
                            rows_kb = slice(i * K * b, (i + 1) * K * b)
                            self._microbatch_loss((h[rows_kb], c[rows_kb]), torch.arange(s.start, s.stop))
            tokens = valid.sum().to(torch.float32)
            learned = scheduler.learned
            if self.has_last:
                parts = [self._parts[i] for i in range(micro)]
                loss = sum(p.surrogate.detach().sum() for p in parts) / normalizer
                result = assemble_loss(parts, normalizer=normalizer, tokens=tokens, loss=loss,
                                       reduce_sums=lambda v: sum_over_dp(v, self.mesh))
                packed = _pack(result, learned)
            else:
                n_stats = len(_STAT_KEYS) + (len(_STAT_KEYS_LEARNED) if learned else 0)
                packed = torch.empty(4 + n_stats + B, dtype=torch.float64, device=x.device)
            dist.broadcast(packed, src=self.last_rank, group=self.group)
            return _unpack(packed, learned, tokens)
        finally:
            self._context = None
            self._parts = {}
