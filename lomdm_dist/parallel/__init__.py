"""The distributed engine: device mesh, tensor/sequence/pipeline parallelism, FSDP2, DCP checkpoints.

Everything is PyTorch's own (DTensor plans, ``torch.distributed.pipelining``, FSDP2, Distributed
Checkpoint) applied to the plain model from the outside; see ``docs/architecture.md``.
"""

from .config import ParallelConfig
from .grads import clip_grad_norm_, finalize_gradients, grad_norm
from .layout import validate_layout
from .mesh import MESH_DIMS, build_mesh, dp_rank, dp_size, local_rows, sum_over_dp
from .parallelize import ParallelModel, parallelize_model
from .step import distributed_loss, evaluation_loss, forward_backward, global_normalizer

__all__ = ["MESH_DIMS", "ParallelConfig", "ParallelModel", "build_mesh", "clip_grad_norm_", "distributed_loss",
           "dp_rank", "dp_size", "evaluation_loss", "finalize_gradients", "forward_backward", "global_normalizer",
           "grad_norm", "local_rows", "parallelize_model", "sum_over_dp", "validate_layout"]
