"""Checkpoints: one on-disk format for one process and for every parallel layout.

A checkpoint is a directory ``run.dir/checkpoints/step-XXXXXXXX/`` holding
- ``state/``: the training state as a Distributed Checkpoint (DCP): model, EMA and optimizer, keyed
  by parameter name (``model.<name>``, ``ema.<name>``, the optimizer flattened per parameter name),
  each rank's shards with DCP's metadata saying which global slice each shard is, so it loads into
  any other layout (TP/PP/FSDP sizes, or one process without a process group);
- ``data/dp<i>-of-<n>.pt``: each data-parallel slice's data-loader position;
- ``ranks/rank<r>-of-<w>.pt``: each rank's RNG state (restored when the layout is unchanged);
- ``trainer.pt`` (step, counters), ``config.yaml``, ``meta.json`` (step, format, layout, vocab size);
- the ``COMPLETE`` marker with every file's sha256; a directory without it does not count.

It is written in a temporary directory and renamed into place, so a crash at any point leaves
every earlier checkpoint intact. The weights are stored once, in ``state/``: a second,
consolidated copy would double every checkpoint's size; readers assemble full tensors from the
shards in one process, whatever layout wrote them.

Modules, each with one job:
- ``protocol``: directory names, the ``COMPLETE`` marker, sha256 verification, atomic rename,
  pruning, ``meta.json``; plain files, no torch;
- ``distributed``: writing and loading the state with every rank through DCP (any layout);
- ``export``: the consolidated view in one process (full tensors by name) and the safetensors
  export, also ``python -m lomdm_dist.checkpoint.export``;
- ``inference``: a ready model (config, weights, scheduler) from a checkpoint.

The trainer and the tools import this package; it imports nothing of the trainer or of the
parallel engine. Names below are imported on first use (PEP 562), so that reading the protocol
(e.g. the Slurm job looking for the latest checkpoint) does not import torch.distributed.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_EXPORTS = {
    "protocol": ["CheckpointError", "DCP_FORMAT", "EMA_WEIGHTS_FILE", "MARKER", "STATE_DIR", "WEIGHTS_FILE",
                 "begin_checkpoint", "checkpoint_root", "complete_checkpoint", "complete_checkpoints",
                 "latest_checkpoint", "read_meta", "resolve_checkpoint", "step_dir_name", "verify_checkpoint"],
    "distributed": ["CheckpointLayout", "LoadedCheckpoint", "PendingCheckpoint", "load_distributed_checkpoint",
                    "save_checkpoint", "save_distributed_checkpoint", "training_state", "write_checkpoint"],
    "export": ["export_consolidated", "export_safetensors", "full_tensors", "load_checkpoint", "saved_parts"],
    "inference": ["load_inference_model"],
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
