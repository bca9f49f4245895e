"""The distributed engine: device mesh, tensor/sequence/pipeline parallelism, FSDP2, DCP checkpoints.

Everything is PyTorch's own (DTensor plans, ``torch.distributed.pipelining``, FSDP2, Distributed
Checkpoint) applied to the plain model from the outside; see ``docs/architecture.md``. One process
is the layout with ``mesh = None``: the same calls, no process group.

Names are imported on first use (PEP 562), so that ``lomdm_dist.parallel.layout`` (pure Python,
what a launcher checks before it starts anything) does not pull in torch.distributed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "config": ["ParallelConfig"],
    "grads": ["clip_grad_norm_", "finalize_gradients", "grad_norm"],
    "layout": ["validate_layout"],
    "mesh": ["MESH_DIMS", "build_mesh", "dim_rank", "dim_size", "dp_rank", "dp_size", "local_rows", "sum_over_dp",
             "writes_dp_slice_state"],
    "parallelize": ["ParallelModel", "parallelize_model"],
    "rng": ["dropout_seed", "seed_dropout"],
    "runtime": ["ProcessEnv", "any_rank", "init_process_group", "process_device", "shutdown_process_group"],
    "step": ["distributed_loss", "evaluation_loss", "forward_backward", "global_loss_values", "global_normalizer"],
    "evaluate": ["distributed_validation_nelbo"],
    "gather": ["gather_full_parameters"],
    "checkpoint": ["CheckpointLayout", "LoadedCheckpoint", "PendingCheckpoint", "load_distributed_checkpoint",
                   "save_distributed_checkpoint", "write_checkpoint"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
