"""Checkpoint task on TP=2 x PP=2: load a one-process checkpoint, evaluate and train on; save,
evaluate, train one more step. The test compares each number with one process."""

from __future__ import annotations

import torch.distributed as dist

from parallel_common import BATCH, PAD_ID, SEED, batches, eval_batches, make_config, make_model
from lomdm_dist.diffusion.objective import StepSpec
from lomdm_dist.diffusion.schedulers import build_scheduler
from lomdm_dist.parallel import (ParallelConfig, build_mesh, clip_grad_norm_, dp_rank, dp_size, forward_backward,
                                 local_rows, parallelize_model)
from lomdm_dist.checkpoint.distributed import (CheckpointLayout, load_distributed_checkpoint,
                                              save_distributed_checkpoint)
from lomdm_dist.parallel.evaluate import distributed_validation_nelbo
from lomdm_dist.train.ema import EMA
from lomdm_dist.train.optimizer import build_optimizer, set_learning_rate

LAYOUT = ParallelConfig(tp=2, pp=2, microbatches=2)


def _train(pm, optimizer, ema, cfg, steps: range) -> list[float]:
    scheduler = build_scheduler(cfg.diffusion)
    data = batches(steps.stop)
    rows = local_rows(pm.mesh, BATCH)
    losses = []
    for step in steps:
        x, valid = data[step]
        set_learning_rate(optimizer, step, cfg.optim.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        out = forward_backward(pm, scheduler, x[rows], StepSpec(seed=SEED, step=step, rows=rows, global_batch=BATCH),
                               cfg=cfg.diffusion, valid=valid[rows])
        clip_grad_norm_(pm.parameters(), cfg.optim.grad_clip, pm.pp_group)
        optimizer.step()
        ema.update(pm.model)
        losses.append(out.loss.item())
    return losses


def _validate(pm, cfg, ema=None) -> float:
    scheduler = build_scheduler(cfg.diffusion)
    if ema is None:
        return distributed_validation_nelbo(pm, scheduler, eval_batches(), cfg=cfg.diffusion, seed=SEED,
                                            pad_id=PAD_ID)["val_nelbo"]
    with ema.swapped_in(pm.model):
        return distributed_validation_nelbo(pm, scheduler, eval_batches(), cfg=cfg.diffusion, seed=SEED,
                                            pad_id=PAD_ID)["val_nelbo"]


def run_checkpoint(source: str, run_dir: str, world_size: int) -> dict:
    cfg = make_config("lomdm")
    model = make_model(cfg, seed=99)   # other weights than the checkpoint's: the load must replace them all
    mesh = build_mesh(cfg, world_size, parallel=LAYOUT)
    pm = parallelize_model(model, mesh, LAYOUT)
    optimizer = build_optimizer(pm.model, cfg.optim)
    ema = EMA(pm.model, 0.9)
    loaded = load_distributed_checkpoint(source, model=pm.model, optimizer=optimizer, ema_shadow=ema.shadow,
                                         dp_rank=dp_rank(mesh), dp_size=dp_size(mesh))
    result = {"loaded_step": loaded.step, "loaded_data_state": loaded.data_state,
              "val_loaded": _validate(pm, cfg), "val_loaded_ema": _validate(pm, cfg, ema)}
    step = loaded.step
    result["losses_after_load"] = _train(pm, optimizer, ema, cfg, range(step, step + 2))
    step += 2
    tp_rank, pp_rank = mesh["tp"].get_local_rank(), mesh["pp"].get_local_rank()
    path = save_distributed_checkpoint(
        run_dir, step, model=pm.model, optimizer=optimizer, ema_shadow=ema.shadow,
        data_state={"dp_rank": dp_rank(mesh), "position": 100 + step}, dp_rank=dp_rank(mesh), dp_size=dp_size(mesh),
        write_data_state=tp_rank == 0 and pp_rank == 0, config_yaml="saved by the TP=2 x PP=2 task\n",
        meta={"vocab_size": model.vocab_size},
        layout=CheckpointLayout(world_size=world_size, tp=LAYOUT.tp, pp=LAYOUT.pp), keep=2)
    result.update(saved_path=str(path), saved_step=step, val_saved=_validate(pm, cfg),
                  val_saved_ema=_validate(pm, cfg, ema))
    result["loss_after_save"] = _train(pm, optimizer, ema, cfg, range(step, step + 1))[0]
    dist.barrier()
    return result
