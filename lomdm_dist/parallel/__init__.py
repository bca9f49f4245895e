"""The distributed engine: device mesh, tensor/sequence/pipeline parallelism, FSDP2, DCP checkpoints.

Everything is PyTorch's own (DTensor plans, ``torch.distributed.pipelining``, FSDP2, Distributed
Checkpoint) applied to the plain model from the outside; see ``docs/architecture.md``.
"""

from .config import ParallelConfig
from .grads import clip_grad_norm_, finalize_gradients, grad_norm
from .layout import validate_layout
from .mesh import MESH_DIMS, build_mesh, dp_rank, dp_size, local_rows, sum_over_dp
from .parallelize import ParallelModel, parallelize_model
from .rng import dropout_seed, seed_dropout
from .step import distributed_loss, evaluation_loss, forward_backward, global_loss_values, global_normalizer
from .evaluate import distributed_validation_nelbo
from .checkpoint import (CheckpointLayout, LoadedCheckpoint, PendingCheckpoint, load_distributed_checkpoint,
                         save_distributed_checkpoint)

__all__ = ["MESH_DIMS", "CheckpointLayout", "LoadedCheckpoint", "ParallelConfig", "ParallelModel", "PendingCheckpoint",
           "build_mesh", "clip_grad_norm_", "distributed_loss", "distributed_validation_nelbo", "dp_rank", "dp_size",
           "dropout_seed",
           "evaluation_loss", "finalize_gradients", "forward_backward", "global_loss_values", "global_normalizer",
           "grad_norm", "load_distributed_checkpoint", "local_rows", "parallelize_model",
           "save_distributed_checkpoint", "seed_dropout", "sum_over_dp", "validate_layout"]
