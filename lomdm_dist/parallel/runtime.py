"""The process side of a distributed run: who am I (torchrun's environment), the process group, and
decisions every rank must take together.

The environment is torchrun's (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), so ``torchrun``, ``launchers/local.py`` and the Slurm launcher
start the same program. The backend is gloo on CPU and NCCL on GPU (each process on the GPU of its
``LOCAL_RANK``). Every collective has a timeout (``parallel.collective_timeout_s``, default 600 s):
a rank that died or hangs brings the others down with an error instead of a silent hang.

``ProcessEnv`` is read before anything heavy happens (a launcher validates with it before it starts
processes), so torch is imported only by the functions that need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Mapping

from ..config.errors import ConfigError

if TYPE_CHECKING:
    import torch


def _int_variable(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class ProcessEnv:
    """This process's place in the job (one process when no variable is set)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "ProcessEnv":
        environ = os.environ if environ is None else environ
        world = _int_variable(environ, "WORLD_SIZE", 1)
        rank = _int_variable(environ, "RANK", 0)
        local_rank = _int_variable(environ, "LOCAL_RANK", rank)
        local_world = _int_variable(environ, "LOCAL_WORLD_SIZE", world)
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"environment variables RANK ({rank}) and WORLD_SIZE ({world}) do not describe a "
                              "process of the job: need 0 <= RANK < WORLD_SIZE")
        if not 0 <= local_rank < max(local_world, 1):
            raise ConfigError(f"environment variable LOCAL_RANK ({local_rank}) must lie in "
                              f"[0, LOCAL_WORLD_SIZE = {local_world})")
        if world > 1:
            missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
            if missing:
                raise ConfigError(f"WORLD_SIZE is {world} but the environment variable(s) {', '.join(missing)} "
                                  "are not set (start the job with launchers/local.py --nproc N or torchrun)")
        return cls(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_autocast(precision: str, device: "torch.device") -> "torch.dtype | None":
    """The autocast dtype of ``train.precision`` on ``device``: bf16 for ``bf16``, and for ``auto`` on
    GPU; None (fp32) otherwise. One rule for training, evaluation and the benchmarks, so a tool
    repeats the numbers a run logged."""
    import torch

    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def process_device(env: ProcessEnv, requested: str) -> "torch.device":
    """The device of this process for ``train.device`` (auto, cpu, cuda): ``cuda:LOCAL_RANK`` on GPU."""
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but CUDA is not available")
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {env.local_rank} has no GPU: this machine has "
                              f"{torch.cuda.device_count()}")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device(requested)


def init_process_group(env: ProcessEnv, device: "torch.device", *, timeout_s: float) -> bool:
    """Start the default process group for a multi-process job; returns whether it started one
    (False for one process, or when the caller had already started it)."""
    import torch.distributed as dist

    if not env.distributed or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=timeout_s),
                            **kwargs)
    return True


def shutdown_process_group(*, clean: bool) -> None:
    """Leave the process group. ``clean``: every rank got here (a barrier first, which keeps gloo
    from aborting a rank at exit while another still talks to it); after an error, no barrier."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def any_rank(flag: bool, device: "torch.device") -> bool:
    """True on every rank when ``flag`` is true on at least one (a decision all ranks must share)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def peak_host_memory_bytes() -> int:
    """This process's peak resident host memory so far, in bytes (``getrusage``'s ``ru_maxrss``,
    which Linux gives in KiB and macOS in bytes). The start-up line reports it: building the model
    on the meta device keeps it near one rank's shard instead of the whole model."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
