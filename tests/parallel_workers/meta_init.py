"""Tasks for models built on the meta device and materialised shard by shard.

``meta=LAYOUT``: the full values of every parameter this rank holds right after
``parallelize_model(meta_model, ..., init_seed=INIT_SEED)`` (the test compares them with
``build_model(..., seed=INIT_SEED)`` in one process).

``layout3d=CKPT_DIR``: the two 3-D layouts of the 8B config at toy size on 8 ranks, in one process
group: tp 2 x pp 2 x dp_shard 2 (A) and HSDP dp_replicate 2 x dp_shard 2 x tp 2 (B). Each starts
from a meta-device model and takes one step; A then writes a checkpoint, which B loads and trains
on for one step. Zero-initialised layers get random values first (the same partial init plan in
one process), so every gradient is non-zero at step 0. Every step costs about 0.7 s of CPU per
rank here, which is why each layout takes the fewest steps its checks need.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from equivalence import LAYOUTS
from parallel_common import (BATCH, INIT_SEED, N_LAYERS, PERTURB_SEED, SAVE_AT, SEED, VOCAB, batches, full,
                             make_config, perturb_plan)
from lomdm_dist.checkpoint.distributed import CheckpointLayout, load_distributed_checkpoint, save_distributed_checkpoint
from lomdm_dist.diffusion.objective import StepSpec
from lomdm_dist.diffusion.schedulers import build_scheduler
from lomdm_dist.model import build_model
from lomdm_dist.parallel import (ParallelConfig, build_mesh, clip_grad_norm_, dp_rank, dp_size, forward_backward,
                                 global_loss_values, local_rows, parallelize_model)
from lomdm_dist.parallel.materialize import materialize_parameters
from lomdm_dist.train.ema import EMA
from lomdm_dist.train.optimizer import build_optimizer, set_learning_rate

LAYOUT_A = ParallelConfig(tp=2, pp=2, dp_shard=2, microbatches=2)
LAYOUT_B = ParallelConfig(dp_replicate=2, dp_shard=2, tp=2)


def meta_parallel_model(cfg, mesh, par: ParallelConfig):
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.diffusion, VOCAB)
    return parallelize_model(model, mesh, par, init_seed=INIT_SEED)


def run_meta(layout: str, world_size: int) -> dict:
    par = LAYOUTS[layout]
    cfg = make_config("lomdm")
    pm = meta_parallel_model(cfg, build_mesh(cfg, world_size, parallel=par), par)
    return {"params": {n: full(p) for n, p in pm.named_parameters()}}


def train(pm, cfg, optimizer, ema, steps: range, record: dict) -> None:
    """``steps`` updates on this rank's rows; the first step's full gradients go to ``record``."""
    scheduler = build_scheduler(cfg.diffusion)
    data = batches(steps.stop)
    rows = local_rows(pm.mesh, BATCH)
    for step in steps:
        x, valid = data[step]
        set_learning_rate(optimizer, step, cfg.optim.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        spec = StepSpec(seed=SEED, step=step, rows=rows, global_batch=BATCH)
        out = forward_backward(pm, scheduler, x[rows], spec, cfg=cfg.diffusion, valid=valid[rows])
        if "grads" not in record:
            record["grads"] = {n: full(p.grad) for n, p in pm.named_parameters()}
        record.setdefault("grad_norms", []).append(clip_grad_norm_(pm.parameters(), cfg.optim.grad_clip,
                                                                   pm.pp_group).item())
        optimizer.step()
        ema.update(pm.model)
        record.setdefault("losses", []).append(global_loss_values(pm, out)["loss"])


def _start(cfg, world_size: int, par: ParallelConfig):
    mesh = build_mesh(cfg, world_size, parallel=par)
    pm = meta_parallel_model(cfg, mesh, par)
    init = {n: full(p) for n, p in pm.named_parameters()}
    materialize_parameters(pm.model, PERTURB_SEED, perturb_plan(pm.model))
    optimizer = build_optimizer(pm.model, cfg.optim)
    return mesh, pm, init, optimizer, EMA(pm.model, 0.9)


def run_layout_3d(world_size: int, ckpt_dir: str) -> dict:
    cfg = make_config("lomdm", n_layers=N_LAYERS)
    # A: tp 2 x pp 2 x dp_shard 2 takes step 0 and saves
    mesh, pm, init, optimizer, ema = _start(cfg, world_size, LAYOUT_A)
    a: dict = {"init": init}
    train(pm, cfg, optimizer, ema, range(0, SAVE_AT), a)
    first = mesh["tp"].get_local_rank() == 0 and mesh["pp"].get_local_rank() == 0
    path = save_distributed_checkpoint(
        ckpt_dir, SAVE_AT, model=pm.model, optimizer=optimizer, ema_shadow=ema.shadow,
        data_state={"dp_rank": dp_rank(mesh)}, dp_rank=dp_rank(mesh), dp_size=dp_size(mesh), write_data_state=first,
        config_yaml="", meta={"vocab_size": VOCAB},
        layout=CheckpointLayout(world_size=world_size, tp=2, pp=2, dp_shard=2), keep=1)
    a["saved_path"] = str(path)
    a["saved_params"] = {n: full(p) for n, p in pm.named_parameters()}
    a["saved_ema"] = {n: full(v) for n, v in ema.shadow.items()}
    # B: HSDP dp_replicate 2 x dp_shard 2 x tp 2, from its own meta init, then from A's checkpoint
    mesh, pm, init, optimizer, ema = _start(cfg, world_size, LAYOUT_B)
    b: dict = {"init": init}
    train(pm, cfg, optimizer, ema, range(0, 1), b)
    loaded = load_distributed_checkpoint(path, model=pm.model, optimizer=optimizer, ema_shadow=ema.shadow,
                                         dp_rank=dp_rank(mesh), dp_size=dp_size(mesh))
    ema.num_updates = loaded.step
    b["loaded_step"] = loaded.step
    b["loaded_params"] = {n: full(p) for n, p in pm.named_parameters()}
    b["loaded_ema"] = {n: full(v) for n, v in ema.shadow.items()}
    resumed: dict = {}
    train(pm, cfg, optimizer, ema, range(SAVE_AT, SAVE_AT + 1), resumed)
    b["loss_after_load"] = resumed["losses"][0]
    dist.barrier()
    return {"A": a, "B": b}
