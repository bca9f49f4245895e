"""Shared pieces of the distributed-engine workers: a tiny config, its data, the single-process
reference (``diffusion_loss`` + ``torch.nn.utils.clip_grad_norm_`` on one full model) and the
collection of full gradients from a sharded model."""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lomdm_dist.config import Config, DataConfig, DiffusionConfig, ModelConfig, OptimConfig
from lomdm_dist.diffusion.objective import StepSpec, diffusion_loss
from lomdm_dist.diffusion.schedulers import build_scheduler
from lomdm_dist.model import ParamInit, build_model, init_plan
from lomdm_dist.train.ema import EMA
from lomdm_dist.train.optimizer import build_optimizer, set_learning_rate

# The meta-initialisation and 3-D layout tests (``meta_init.py``, ``test_layout_3d.py``).
INIT_SEED = 11
PERTURB_SEED = 12
N_LAYERS = 2            # one block per pipeline stage
SAVE_AT = 1             # A saves after step 0; step 1 is the first step after a resume


def perturb_plan(model: torch.nn.Module) -> dict[str, ParamInit]:
    """Uniform values in +-0.5 for the zero-initialised parameters ``model`` holds, so that no
    gradient of a layout test is trivially zero."""
    return {name: ParamInit("uniform", 0.5) for name, spec in init_plan(model).items() if spec.kind == "zeros"}

VOCAB = 61          # odd: the vocabulary splits unevenly over two tensor-parallel ranks (31 + 30)
SEQ_LEN = 16
BATCH = 8
STEPS = 5
SEED = 3


def make_config(scheduler: str = "lomdm", n_layers: int = 4) -> Config:
    cfg = Config(data=DataConfig(seq_len=SEQ_LEN, batch_size=BATCH, eval_batch_size=BATCH),
                 model=ModelConfig(n_layers=n_layers, d_model=32, n_heads=4, cond_dim=16, mlp_ratio=2,
                                   dropout=0.0, head_mlp_hidden=16),
                 diffusion=DiffusionConfig(scheduler=scheduler),
                 optim=OptimConfig(lr=3e-3, warmup_steps=2, grad_clip=1.0))
    return cfg.validate()


def make_model(cfg: Config, seed: int = 0) -> torch.nn.Module:
    """The model with every zero-initialised layer given random weights, so all gradients are non-zero."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.diffusion, VOCAB)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modulation" in name or "final.linear" in name or ".out." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, valid) per step; row 1 ends in three padding positions."""
    gen = torch.Generator().manual_seed(123)
    out = []
    for _ in range(steps):
        x = torch.randint(0, VOCAB - 1, (BATCH, SEQ_LEN), generator=gen)
        valid = torch.ones_like(x, dtype=torch.bool)
        valid[1, -3:] = False
        out.append((x, valid))
    return out


PAD_ID = VOCAB - 2


def eval_batches() -> list[torch.Tensor]:
    """Two global validation batches; row 2 of each ends in padding (PAD_ID)."""
    gen = torch.Generator().manual_seed(456)
    out = []
    for _ in range(2):
        x = torch.randint(0, VOCAB - 2, (BATCH, SEQ_LEN), generator=gen)
        x[2, -5:] = PAD_ID
        out.append(x)
    return out


def single_process_steps(cfg: Config, model: torch.nn.Module, optimizer, ema: EMA, steps: range) -> list[float]:
    """Updates ``steps`` of one process on the whole batch (the reference for resumed runs)."""
    scheduler = build_scheduler(cfg.diffusion)
    data = batches(steps.stop)
    losses = []
    for step in steps:
        x, valid = data[step]
        set_learning_rate(optimizer, step, cfg.optim.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        out = diffusion_loss(model, scheduler, x, StepSpec(seed=SEED, step=step, rows=torch.arange(BATCH),
                                                            global_batch=BATCH), cfg=cfg.diffusion, valid=valid)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        ema.update(model)
        losses.append(out.loss.item())
    return losses


def reference_run(cfg: Config, model: torch.nn.Module, steps: int = STEPS) -> dict:
    """One process, the whole batch: step-0 loss and gradients, then the losses of ``steps`` updates."""
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    scheduler = build_scheduler(cfg.diffusion)
    optimizer = build_optimizer(model, cfg.optim)
    ema = EMA(model, 0.9)
    rows = torch.arange(BATCH)
    record: dict = {"losses": [], "nelbo": [], "grad_norms": []}
    for step, (x, valid) in enumerate(batches(steps)):
        set_learning_rate(optimizer, step, cfg.optim.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        out = diffusion_loss(model, scheduler, x, StepSpec(seed=SEED, step=step, rows=rows, global_batch=BATCH),
                             cfg=cfg.diffusion, valid=valid)
        out.loss.backward()
        if step == 0:
            record["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            record["row_nelbo"] = out.row_nelbo.clone()
            record["stats"] = {k: v.item() for k, v in out.stats.items()}
        record["grad_norms"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip).item())
        optimizer.step()
        ema.update(model)
        record["losses"].append(out.loss.item())
        record["nelbo"].append(out.nelbo.item())
    record["ema"] = {n: v.clone() for n, v in ema.shadow.items()}
    record["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return record


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A full copy of a possibly sharded tensor (collective for DTensors)."""
    return tensor.full_tensor().detach().clone() if isinstance(tensor, DTensor) else tensor.detach().clone()


def init() -> tuple[int, int]:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def finish(out_dir: str, results: dict) -> None:
    rank = dist.get_rank()
    path = os.path.join(out_dir, f"rank{rank}.pt")
    torch.save(results, path + ".tmp")
    os.replace(path + ".tmp", path)
    dist.barrier()
    dist.destroy_process_group()
