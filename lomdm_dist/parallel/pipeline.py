"""Pipeline parallelism with ``torch.distributed.pipelining`` and the two-phase LoMDM step.

Split: the DiT blocks are cut into ``num_stages`` stages of equal depth; stage 0 also holds the
embedding and the conditioning MLP, the last stage the output layer and the phi/psi heads. Stage
s lives on pipeline rank ``s % pp`` (the looped assignment interleaved schedules expect). A rank
keeps only its own parts: blocks of other stages are replaced by :class:`PipelineHole` so that
indices and parameter names stay those of the full model (checkpoints, EMA and optimizer state
are keyed by name and must not depend on the layout).

Between stages travel the hidden states ``h`` and the adaLN conditioning ``c`` (c is made at
stage 0 and every block reads it; its gradient flows back to the conditioning MLP).

The step itself is ``lomdm_dist.diffusion.objective.diffusion_loss``, which owns every formula;
:class:`PipelinePasses` supplies its features through pipeline schedules and keeps only the
scheduling and the communication. The LoMDM step cannot be one pipeline pass, because the masks of
the with-grad pass depend on the phi head at the last stage, computed from the clean rows. So
(``design.md``):

1. a forward-only pass (no grad) over all microbatches of the clean rows; the last stage keeps the
   clean features and conditioning, detached, and computes the exponents k_phi;
2. k_phi goes back to the first stage (a broadcast over the pipeline group; every stage then draws
   the same masks from k_phi and the counter-based uniforms, which need no communication);
3. a 1F1B (or GPipe / interleaved 1F1B) pass over the masked microbatches; the loss function at
   the last stage re-applies the phi head *with grad* to the stored clean features of the
   microbatch's rows, runs the psi head and the vocab-parallel loss, and returns the microbatch's
   share of the surrogate (summed, divided by the global token count, so the schedule must not
   rescale gradients);
4. the last stage assembles the step's ``LossOutput`` and sends it to the other stages.

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

from ..diffusion.objective import CleanPass, LossOutput, MicrobatchLoss
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


class PipelineRunner:
    """The stages this rank holds and their schedules (built once per batch shape): forward-only
    passes, and the masked pass with the objective's loss per microbatch at the last stage."""

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
        self._step_loss: MicrobatchLoss | None = None

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

    def forward_only(self, kind: str, tokens: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor] | None:
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

    # ------------------------------------------------------------------ the masked pass
    def _microbatch_loss(self, output: tuple[Tensor, Tensor], target: Tensor) -> Tensor:
        """The schedules' loss function at the last stage; ``target`` holds the microbatch's index.

        A schedule is built once per batch shape with this bound method, so the objective's loss of
        the current step is looked up here, not captured."""
        if self._step_loss is None:
            raise RuntimeError("a pipeline schedule ran its loss outside PipelinePasses.masked_pass")
        h, c = output
        return self._step_loss(int(target[0]), h, c)

    def masked_pass(self, z: Tensor, sigma: Tensor, loss: MicrobatchLoss, *, backward: bool) -> None:
        """The masked copies through the stages, ``loss`` per microbatch at the last stage: 1F1B (or
        the configured schedule) with ``backward``, else a forward-only pass and ``loss`` without grad."""
        micro = self.parallel.microbatches
        self._step_loss = loss
        try:
            if backward:
                schedule = self._schedule("masked", (z.shape[0], z.shape[1]), self._microbatch_loss)
                args = (z, sigma) if self.has_first else ()
                schedule.step(*args, target=torch.arange(micro) if self.has_last else None, return_outputs=False)
                return
            out = self.forward_only("masked-eval", z, sigma)
            if out is not None:
                h, c = out
                per = z.shape[0] // micro
                with torch.no_grad():
                    for i in range(micro):
                        rows = slice(i * per, (i + 1) * per)
                        self._microbatch_loss((h[rows], c[rows]), torch.tensor([i]))
        finally:
            self._step_loss = None


class PipelinePasses:
    """``diffusion_loss``'s passes under pipeline parallelism (see the module docstring): every rank
    of the pipeline group calls ``diffusion_loss`` with the same rows and one of these."""

    def __init__(self, runner: PipelineRunner, *, backward: bool) -> None:
        self.runner = runner
        self.backpropagates = backward
        self.token_loss = runner.token_loss
        self.reduce_sums = lambda v: sum_over_dp(v, runner.mesh)

    def microbatches(self, rows: int) -> list[slice]:
        micro = self.runner.parallel.microbatches
        if rows % micro:
            raise ValueError(f"the local batch ({rows} rows) is not divisible by parallel.microbatches ({micro})")
        b = rows // micro
        return [slice(i * b, (i + 1) * b) for i in range(micro)]

    def clean_pass(self, x: Tensor, sigma: Tensor, to_exponents: Callable[[Tensor], Tensor]) -> CleanPass:
        """Forward-only pass over the clean rows; the last stage keeps their features (detached),
        computes the exponents and broadcasts them to the pipeline group."""
        runner = self.runner
        phi = runner.model.phi
        clean = runner.forward_only("clean", x, sigma)
        k = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        g_phi = None
        if clean is not None:
            h_clean, c_clean = clean
            with torch.no_grad():
                k = to_exponents(phi(h_clean, c_clean).float())

            def g_phi(rows: slice) -> Tensor:      # re-applied with grad per microbatch
                return phi(h_clean[rows], c_clean[rows]).float()
        dist.broadcast(k, src=runner.last_rank, group=runner.group)
        return CleanPass(k=k, phi=g_phi)

    def masked_pass(self, z: Tensor, sigma: Tensor, loss: MicrobatchLoss) -> None:
        self.runner.masked_pass(z, sigma, loss, backward=self.backpropagates)

    def share(self, out: LossOutput | None) -> LossOutput:
        """The last stage's result on every rank of the pipeline group (as an object: which statistics
        it holds depends on the scheduler, and only the last stage computed them)."""
        runner = self.runner
        payload = [out.to("cpu") if runner.has_last else None]
        dist.broadcast_object_list(payload, src=runner.last_rank, group=runner.group, device=runner.device)
        return payload[0].to(runner.device)
