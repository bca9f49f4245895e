"""Reading a checkpoint's Distributed Checkpoint shards in one process, whatever layout wrote them.

DCP's metadata says the global shape and dtype of every saved tensor; loading into full-size
empty tensors with ``no_dist=True`` assembles them from every rank's shards without a process
group. Resume, the consolidated view (``export.py``) and the inference loader read through here.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .protocol import CheckpointError


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns that it assumes one process when it is told not to communicate; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def full_tensors(state_dir: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor saved under ``prefix`` (``model`` or ``ema``) as a full CPU tensor, whatever the
    layout that wrote the shards (one process, no collectives)."""
    reader = FileSystemReader(str(state_dir))
    metadata = reader.read_metadata().state_dict_metadata
    start = prefix + "."
    template = {key[len(start):]: torch.empty(item.size, dtype=item.properties.dtype)
                for key, item in metadata.items()
                if key.startswith(start) and isinstance(item, TensorStorageMetadata)}
    if template:
        with single_process_quiet():
            dcp.load({prefix: template}, storage_reader=reader, no_dist=True)
    return template


def saved_parts(state_dir: Path) -> set[str]:
    """The top-level parts of a saved state (``model``, ``ema``, ``optimizer``), from DCP's metadata alone."""
    try:
        metadata = FileSystemReader(str(state_dir)).read_metadata().state_dict_metadata
    except Exception as err:  # a missing or damaged .metadata file: name the directory, not DCP's internals
        raise CheckpointError(f"{state_dir}: unreadable Distributed Checkpoint metadata "
                              f"({type(err).__name__}: {err})") from None
    return {key.split(".", 1)[0] for key in metadata}
