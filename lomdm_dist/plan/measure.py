"""Measure what the planner predicts: the bytes one training step saves for backward (any device)
and, on CUDA, the peak memory of a whole training step.

Saved bytes are counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd
packs during the forward of ``diffusion_loss`` is recorded once per storage (views and tensors
saved by several ops share a storage), parameters excluded. The hook keeps a reference to each
storage so that no address is reused while the forward runs. Activation checkpointing's own hooks
take over inside a checkpointed block; the block's inputs, which the checkpoint saves before its
hooks start, are still seen.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..config.schema import Config
from ..diffusion.objective import LossOutput, StepSpec, diffusion_loss
from ..diffusion.schedulers import Scheduler, build_scheduler
from ..model import build_model
from ..parallel.activation_checkpointing import apply_activation_checkpointing


def training_forward(model: nn.Module, scheduler: Scheduler, x: torch.Tensor, cfg: Config, *, step: int = 0
                     ) -> LossOutput:
    """The forward of one single-process training step (the trainer's call of the objective)."""
    spec = StepSpec(seed=cfg.train.seed, step=step, rows=torch.arange(x.shape[0], device=x.device),
                    global_batch=x.shape[0])
    return diffusion_loss(model, scheduler, x, spec, cfg=cfg.diffusion)


@dataclass
class SavedMeasurement:
    saved_bytes: int
    """Bytes of distinct storages saved for backward, parameters excluded."""
    tensors: int
    output: LossOutput


_VIEW_OR_CAST = ("ToCopyBackward0", "TBackward0", "ViewBackward0", "UnsafeViewBackward0", "TransposeBackward0",
                 "PermuteBackward0", "ExpandBackward0")


def _is_parameter_copy(t: torch.Tensor) -> bool:
    """True for autocast's cached low-precision copy of a parameter (or a view of it): its autograd
    history is casts and views back to a parameter's AccumulateGrad. Such copies are model state
    (``memory.py`` counts them), not activations."""
    node = t.grad_fn
    for _ in range(4):
        if node is None:
            return False
        if type(node).__name__ == "AccumulateGrad":
            return True
        if type(node).__name__ not in _VIEW_OR_CAST:
            return False
        nexts = [n for n, _ in node.next_functions if n is not None]
        if len(nexts) != 1:
            return False
        node = nexts[0]
    return False


def saved_tensor_bytes(model: nn.Module, run) -> SavedMeasurement:
    """Run ``run()`` (a forward) and count the distinct storages it saves for backward, leaving out
    parameters and autocast's copies of them."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    keep: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen and not _is_parameter_copy(t):
            seen[ptr] = storage.nbytes()
            keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = run()
    return SavedMeasurement(saved_bytes=sum(seen.values()), tensors=len(seen), output=output)


def build_for_measurement(cfg: Config, vocab_size: int, device: torch.device | str = "cpu") -> nn.Module:
    """The trainer's single-process model: built under the run's seed, checkpointed as configured."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.diffusion, vocab_size).to(device)
    apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing)
    return model.train()


def random_rows(rows: int, seq_len: int, vocab_size: int, device, seed: int = 0) -> torch.Tensor:
    """Token rows without the mask token (the last id), from a fixed generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size - 1, (rows, seq_len), generator=gen).to(device)


def measure_saved(cfg: Config, vocab_size: int, rows: int, *, autocast: torch.dtype | None = None,
                  param_dtype: torch.dtype | None = None, device: str = "cpu") -> SavedMeasurement:
    """Saved-for-backward bytes of one training forward of ``rows`` rows. ``param_dtype`` casts the
    parameters first, which is what FSDP's mixed precision hands the forward (bf16 parameters)."""
    model = build_for_measurement(cfg, vocab_size, device)
    if param_dtype is not None:
        model.to(param_dtype)
    scheduler = build_scheduler(cfg.diffusion)
    x = random_rows(rows, cfg.data.seq_len, vocab_size, device, cfg.train.seed)
    ctx = torch.autocast(device, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with ctx:
        return saved_tensor_bytes(model, lambda: training_forward(model, scheduler, x, cfg))


@dataclass
class PeakMeasurement:
    peak_bytes: int
    """``torch.cuda.max_memory_allocated`` over a whole training step (after a first one, so the
    optimizer state exists)."""
    saved_bytes: int
    masked_fraction: float


def measure_cuda_peak(cfg: Config, vocab_size: int, rows: int) -> PeakMeasurement:
    """Peak CUDA memory of the trainer's single-GPU step: bf16 autocast, fp32 weights, fused
    AdamW, fp32 EMA; the second of two steps is measured."""
    from ..train.ema import EMA
    from ..train.optimizer import build_optimizer

    device = torch.device("cuda")
    model = build_for_measurement(cfg, vocab_size, device)
    scheduler = build_scheduler(cfg.diffusion)
    optimizer = build_optimizer(model, cfg.optim, fused=True)
    ema = EMA(model, cfg.train.ema_decay)
    x = random_rows(rows, cfg.data.seq_len, vocab_size, device, cfg.train.seed)
    bf16 = cfg.train.precision != "fp32"
    saved = 0
    fraction = 0.0
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            measured = saved_tensor_bytes(model, lambda: training_forward(model, scheduler, x, cfg, step=step))
            measured.output.loss.backward()
        optimizer.step()
        ema.update(model)
        saved = measured.saved_bytes
        fraction = float(measured.output.stats["masked_fraction"])
    torch.cuda.synchronize()
    return PeakMeasurement(peak_bytes=torch.cuda.max_memory_allocated(device), saved_bytes=saved,
                           masked_fraction=fraction)
