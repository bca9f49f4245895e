"""The distributed engine: device mesh, tensor/sequence/pipeline parallelism, FSDP2.

Everything is PyTorch's own (DTensor plans, ``torch.distributed.pipelining``, FSDP2) applied to the
plain model from the outside; see ``docs/architecture.md``. Checkpoints (Distributed Checkpoint,
any layout) are ``lomdm_dist.checkpoint``'s. One process
is the layout with ``mesh = None``: the same calls, no process group.

Names are imported on first use (PEP 562), so that ``lomdm_dist.parallel.layout`` (pure Python,
what a launcher checks before it starts anything) does not pull in torch.distributed.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_EXPORTS = {
    "config": ["ParallelConfig"],
    "grads": ["clip_grad_norm_", "finalize_gradients", "grad_norm"],
    "layout": ["validate_layout"],
    "mesh": ["MESH_DIMS", "build_mesh", "dim_rank", "mesh_from_layout", "dim_size", "dp_rank", "dp_size", "local_rows", "sum_over_dp",
             "writes_dp_slice_state"],
    "parallelize": ["ParallelModel", "parallelize_model"],
    "rng": ["dropout_seed", "seed_dropout"],
    "runtime": ["ProcessEnv", "any_rank", "init_process_group", "process_device", "shutdown_process_group"],
    "step": ["distributed_loss", "evaluation_loss", "forward_backward", "global_loss_values", "global_normalizer"],
    "evaluate": ["distributed_validation_nelbo"],
    "gather": ["gather_full_parameters"],
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
