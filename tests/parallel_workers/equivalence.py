"""Equivalence task: for a named layout, the sharded step-0 loss, gradients and five updates,
next to the single-process reference computed in the same process."""

from __future__ import annotations

from functools import lru_cache

from parallel_common import BATCH, SEED, STEPS, batches, full, make_config, make_model, reference_run
from lomdm_dist.diffusion.objective import StepSpec
from lomdm_dist.diffusion.schedulers import build_scheduler
from lomdm_dist.parallel import (ParallelConfig, build_mesh, clip_grad_norm_, forward_backward, global_loss_values,
                                 local_rows, parallelize_model, seed_dropout)
from lomdm_dist.train.ema import EMA
from lomdm_dist.train.optimizer import build_optimizer, set_learning_rate

LAYOUTS = {
    "tp2": ParallelConfig(tp=2),
    "tp2sp": ParallelConfig(tp=2, sequence_parallel=True),
    "fsdp2": ParallelConfig(dp_shard=2),
    "ddp2": ParallelConfig(dp_replicate=2),
    "pp2": ParallelConfig(pp=2, microbatches=2),
    "pp2gpipe": ParallelConfig(pp=2, microbatches=4, pipeline_schedule="gpipe"),
    "pp2i": ParallelConfig(pp=2, microbatches=2, pipeline_schedule="interleaved_1f1b", virtual_stages=2),
    "tp2pp2": ParallelConfig(tp=2, pp=2, microbatches=2),
    "tp2pp2sp": ParallelConfig(tp=2, pp=2, microbatches=2, sequence_parallel=True),
    "tp2fsdp2": ParallelConfig(tp=2, dp_shard=2),
    "pp2fsdp2": ParallelConfig(pp=2, dp_shard=2, microbatches=2),
    "tp2ac": ParallelConfig(tp=2, activation_checkpointing="full"),
    "pp2ac": ParallelConfig(pp=2, microbatches=2, activation_checkpointing="selective"),
}


@lru_cache(maxsize=None)
def cached_reference(scheduler_name: str, steps: int) -> dict:
    cfg = make_config(scheduler_name)
    return reference_run(cfg, make_model(cfg), steps)


def run_layout(name: str, world_size: int) -> dict:
    """``name`` = LAYOUT-SCHEDULER[-steps] (e.g. tp2-lomdm, tp2pp2-block-1)."""
    layout, scheduler_name, *rest = name.split("-")
    steps = int(rest[0]) if rest else STEPS
    par = LAYOUTS[layout]
    cfg = make_config(scheduler_name)
    model = make_model(cfg)
    reference = cached_reference(scheduler_name, steps)

    mesh = build_mesh(cfg, world_size, parallel=par)
    pm = parallelize_model(model, mesh, par)
    scheduler = build_scheduler(cfg.diffusion)
    optimizer = build_optimizer(pm.model, cfg.optim)
    ema = EMA(pm.model, 0.9)
    rows = local_rows(mesh, BATCH)
    record: dict = {"losses": [], "nelbo": [], "grad_norms": []}
    for step, (x, valid) in enumerate(batches(steps)):
        set_learning_rate(optimizer, step, cfg.optim.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        out = forward_backward(pm, scheduler, x[rows], StepSpec(seed=SEED, step=step, rows=rows, global_batch=BATCH),
                               cfg=cfg.diffusion, valid=valid[rows])
        if step == 0:
            record["grads"] = {n: full(p.grad) for n, p in pm.named_parameters()}
            record["row_nelbo"] = out.row_nelbo.clone()
            record["rows"] = rows.clone()
            record["stats"] = {k: v.item() for k, v in out.stats.items()}
            record["logged_stats"] = {k: v for k, v in global_loss_values(pm, out).items() if k in out.stats}
        record["grad_norms"].append(clip_grad_norm_(pm.parameters(), cfg.optim.grad_clip, pm.pp_group).item())
        optimizer.step()
        ema.update(pm.model)
        logged = global_loss_values(pm, out)
        record["losses"].append(logged["loss"])
        record["nelbo"].append(logged["nelbo"])
    record["ema"] = {n: full(v) for n, v in ema.shadow.items()}
    record["params"] = {n: full(p) for n, p in pm.named_parameters()}
    return {"reference": reference, "parallel": record}


def run_dropout(layout: str, world_size: int) -> dict:
    """One step with dropout 0.1 after ``seed_dropout``: the loss each rank computes (replicated
    over the tensor-parallel group) and the gradient of a replicated norm weight."""
    par = LAYOUTS[layout]
    cfg = make_config("mdlm")
    cfg.model.dropout = 0.1
    model = make_model(cfg)
    mesh = build_mesh(cfg, world_size, parallel=par)
    pm = parallelize_model(model, mesh, par)
    seed = seed_dropout(SEED, mesh, par.sequence_parallel)
    x, valid = batches(1)[0]
    rows = local_rows(mesh, BATCH)
    out = forward_backward(pm, build_scheduler(cfg.diffusion), x[rows],
                           StepSpec(seed=SEED, step=0, rows=rows, global_batch=BATCH), cfg=cfg.diffusion,
                           valid=valid[rows])
    grad = dict(pm.named_parameters())["backbone.blocks.1.norm2.weight"].grad
    return {"seed": seed, "loss": out.loss.item(), "norm_grad": full(grad),
            "reference": cached_reference("mdlm", 1)["losses"][0]}
