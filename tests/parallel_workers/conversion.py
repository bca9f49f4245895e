"""Conversion worker (2 ranks): a TP=2 checkpoint through tools/convert_checkpoint.py into FSDP.

usage: conversion.py OUT_DIR WORK_DIR
1. TP=2: two training steps of the tiny model, a checkpoint under WORK_DIR/tp2, its full raw and
   EMA tensors and validation NELBO (EMA weights);
2. rank 0 runs the command line: sharded -> WORK_DIR/consolidated (EMA weights), consolidated ->
   WORK_DIR/back (a sharded, weights-only run directory);
3. FSDP dp_shard=2: a model with other weights loads WORK_DIR/back (no optimizer state), gives its
   full tensors and the validation NELBO.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch.distributed as dist
import yaml

from parallel_common import (BATCH, PAD_ID, SEED, VOCAB, batches, eval_batches, finish, full, init, make_config,
                             make_model)
from lomdm_dist.checkpoint import saved_parts
from lomdm_dist.checkpoint.distributed import (CheckpointLayout, load_distributed_checkpoint,
                                               save_distributed_checkpoint)
from lomdm_dist.config import config_to_dict
from lomdm_dist.diffusion.objective import StepSpec
from lomdm_dist.diffusion.schedulers import build_scheduler
from lomdm_dist.parallel import (ParallelConfig, build_mesh, clip_grad_norm_, dp_rank, dp_size, forward_backward,
                                 local_rows, parallelize_model)
from lomdm_dist.parallel.evaluate import distributed_validation_nelbo
from lomdm_dist.train.ema import EMA
from lomdm_dist.train.optimizer import build_optimizer, set_learning_rate

TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"


def _validate(pm, cfg, ema: EMA) -> float:
    with ema.swapped_in(pm.model):
        return distributed_validation_nelbo(pm, build_scheduler(cfg.diffusion), eval_batches(), cfg=cfg.diffusion,
                                            seed=SEED, pad_id=PAD_ID)["val_nelbo"]


def _convert(*args: str) -> None:
    result = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=240)
    if result.returncode != 0:
        raise RuntimeError(f"convert_checkpoint.py {' '.join(args)} failed:\n{result.stderr}")


def main() -> None:
    out_dir, work = sys.argv[1], Path(sys.argv[2])
    rank, world_size = init()
    cfg = make_config("lomdm", n_layers=2)
    result: dict = {}

    tp = ParallelConfig(tp=2)
    mesh = build_mesh(cfg, world_size, parallel=tp)
    pm = parallelize_model(make_model(cfg), mesh, tp)
    optimizer, ema = build_optimizer(pm.model, cfg.optim), EMA(pm.model, 0.9)
    scheduler, rows, data = build_scheduler(cfg.diffusion), local_rows(mesh, BATCH), batches(2)
    for step, (x, valid) in enumerate(data):
        set_learning_rate(optimizer, step, cfg.optim.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        forward_backward(pm, scheduler, x[rows], StepSpec(seed=SEED, step=step, rows=rows, global_batch=BATCH),
                         cfg=cfg.diffusion, valid=valid[rows])
        clip_grad_norm_(pm.parameters(), cfg.optim.grad_clip, pm.pp_group)
        optimizer.step()
        ema.update(pm.model)
    source = save_distributed_checkpoint(
        work / "tp2", 2, model=pm.model, optimizer=optimizer, ema_shadow=ema.shadow, dp_rank=dp_rank(mesh),
        dp_size=dp_size(mesh), trainer_state={"step": 2, "ema_num_updates": ema.num_updates, "nonfinite_total": 0,
                                              "nonfinite_in_row": 0},
        config_yaml=yaml.safe_dump(config_to_dict(cfg), sort_keys=False),
        meta={"vocab_size": VOCAB, "tokenizer": cfg.data.tokenizer, "scheduler": cfg.diffusion.scheduler},
        layout=CheckpointLayout(world_size=world_size, tp=2), keep=1)
    result["params"] = {name: full(p) for name, p in pm.model.named_parameters()}
    result["ema"] = {name: full(value) for name, value in ema.shadow.items()}
    result["tp2_val_ema"] = _validate(pm, cfg, ema)

    if rank == 0:
        _convert(str(source), str(work / "consolidated"), "--weights", "ema")
        _convert(str(work / "consolidated"), str(work / "back"), "--to", "sharded")
    dist.barrier()

    fsdp = ParallelConfig(dp_shard=2)
    mesh = build_mesh(cfg, world_size, parallel=fsdp)
    pm = parallelize_model(make_model(cfg, seed=99), mesh, fsdp)
    ema = EMA(pm.model, 0.9)
    loaded = load_distributed_checkpoint(work / "back", model=pm.model, ema_shadow=ema.shadow,
                                         dp_rank=dp_rank(mesh), dp_size=dp_size(mesh))
    result["fsdp_loaded_step"] = loaded.step
    result["fsdp_parts"] = sorted(saved_parts(loaded.path / "state"))
    result["fsdp_params"] = {name: full(p) for name, p in pm.model.named_parameters()}
    result["fsdp_val"] = _validate(pm, cfg, ema)
    finish(out_dir, result)


if __name__ == "__main__":
    main()
