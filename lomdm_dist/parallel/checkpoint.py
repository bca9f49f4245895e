"""Sharded, reshardable checkpoints through Distributed Checkpoint (DCP).

Every rank writes its own shards of the model, the EMA and the optimizer state into one
directory; DCP's metadata records which global slice each shard is, so the checkpoint loads into
any other layout (TP/PP/FSDP sizes, or one process without a process group): the target model's
own DTensors say which slices each rank reads. Keys are parameter names (``model.<name>``,
``ema.<name>``, the optimizer flattened per parameter name), never positions.

Completion protocol, shared with ``lomdm_dist.train.checkpoint`` (same directory names, marker
and hash check, so ``latest_checkpoint`` and ``verify_checkpoint`` work on both kinds):

1. every rank writes into ``checkpoints/.tmp-step-XXXXXXXX``; each data-parallel group's first
   rank adds the data-loader state of its slice (``data/dp<i>-of-<n>.pt``);
2. after a barrier rank 0 writes ``config.yaml`` and ``meta.json`` (step, layout, world size),
   hashes every file into the ``COMPLETE`` marker, renames the directory to ``step-XXXXXXXX``
   and prunes old checkpoints; a final barrier lets no rank run ahead of the rename.

``async_save`` (worth it on GPU) returns a :class:`PendingCheckpoint` whose ``finish()`` waits for
the background write and then runs step 2; until then the directory is not complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..train.checkpoint import (MARKER, CheckpointError, _fsync_dir, _fsync_file, _sha256, checkpoint_root,
                                complete_checkpoints, resolve_checkpoint, step_dir_name)

_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
DCP_FORMAT = "dcp"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes one process when no group exists; here that is the intent."""
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                   ema_shadow: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The DCP state dict of this rank: its model part, EMA shadows and optimizer state, by name."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if ema_shadow is not None:
        state["ema"] = dict(ema_shadow)
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=_OPTIM_OPTIONS)
    return state


@dataclass
class CheckpointLayout:
    """Recorded in meta.json so a resume can tell that the layout changed (and reshard)."""

    world_size: int
    tp: int = 1
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1


@dataclass
class PendingCheckpoint:
    """An asynchronous save in flight; ``finish()`` completes it (all ranks must call it)."""

    future: Future | None
    tmp: Path
    final: Path
    root: Path
    step: int
    config_yaml: str
    meta: dict
    keep: int

    def finish(self) -> Path:
        if self.future is not None:
            self.future.result()
        return _complete(self.tmp, self.final, self.root, self.step, self.config_yaml, self.meta, self.keep)


def _complete(tmp: Path, final: Path, root: Path, step: int, config_yaml: str, meta: dict, keep: int) -> Path:
    _barrier()
    if _rank() == 0:
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "format": DCP_FORMAT}, indent=1))
        hashes = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_file(path)
            hashes[str(path.relative_to(tmp))] = _sha256(path)
        marker = tmp / MARKER
        marker.write_text(json.dumps({"step": step, "time": time.time(), "sha256": hashes}, indent=1))
        _fsync_file(marker)
        if final.exists():
            trash = root / f".tmp-old-{step_dir_name(step)}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        if keep > 0:
            for _, old in complete_checkpoints(root.parent)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def save_distributed_checkpoint(run_dir: str | os.PathLike, step: int, *, model: nn.Module,
                                optimizer: torch.optim.Optimizer | None = None,
                                ema_shadow: dict[str, torch.Tensor] | None = None, data_state: Any = None,
                                dp_rank: int = 0, dp_size: int = 1, write_data_state: bool = True,
                                trainer_state: dict | None = None, config_yaml: str = "", meta: dict | None = None,
                                layout: CheckpointLayout | None = None, keep: int = 3,
                                async_save: bool = False) -> Path | PendingCheckpoint:
    """Write one checkpoint with every rank (collective); returns the final directory.

    ``data_state``: this rank's data-loader state, written once per data-parallel slice (by the
    ranks with ``write_data_state`` True, i.e. tp rank 0 of pipeline stage 0). ``trainer_state``:
    step, EMA update count, counters... (the same on every rank; rank 0 writes ``trainer.pt``).
    """
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "data").mkdir()
    _barrier()
    if data_state is not None and write_data_state:
        torch.save(data_state, tmp / "data" / f"dp{dp_rank}-of-{dp_size}.pt")
    if trainer_state is not None and _rank() == 0:
        torch.save(trainer_state, tmp / "trainer.pt")
    full_meta = dict(meta or {})
    if layout is not None:
        full_meta["layout"] = asdict(layout)
    state = training_state(model, optimizer, ema_shadow)
    writer = tmp / "state"
    if async_save:
        with _single_process_quiet():
            future = dcp.async_save(state, checkpoint_id=str(writer), no_dist=not _distributed())
        if not isinstance(future, Future):  # AsyncSaveResponse in newer releases
            future = future.upload_completion
        return PendingCheckpoint(future, tmp, final, root, step, config_yaml, full_meta, keep)
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(writer), no_dist=not _distributed())
    return _complete(tmp, final, root, step, config_yaml, full_meta, keep)


def _first_error(failure: Any) -> str:
    """DCP records a failure as (exception, traceback summary); keep the exception's text."""
    exc = failure[0] if isinstance(failure, tuple) and failure else failure
    return f"{type(exc).__name__}: {exc}"


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    meta: dict
    config_yaml: str
    trainer_state: dict | None
    data_state: Any
    """This rank's data-loader state when the data-parallel size is unchanged, else None."""
    data_states: dict[int, Path]
    """Every saved slice's state file by dp index (for a loader that can reshard its position)."""


def load_distributed_checkpoint(path: str | os.PathLike, *, model: nn.Module,
                                optimizer: torch.optim.Optimizer | None = None,
                                ema_shadow: dict[str, torch.Tensor] | None = None, dp_rank: int = 0,
                                dp_size: int = 1, verify: bool = True) -> LoadedCheckpoint:
    """Load a checkpoint (or a run directory's latest) into this rank's model part, in place.

    Works in any layout and without a process group. ``ema_shadow`` tensors are filled in place.
    """
    from ..train.checkpoint import verify_checkpoint

    ckpt = resolve_checkpoint(path)
    if verify and _rank() == 0:
        verify_checkpoint(ckpt)
    _barrier()
    meta_path = ckpt / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {ckpt}: unreadable meta.json ({err})") from None
    if meta.get("format") != DCP_FORMAT:
        raise CheckpointError(f"checkpoint {ckpt} is not a distributed (DCP) checkpoint; "
                              "load it with lomdm_dist.train.checkpoint.load_checkpoint")
    state = training_state(model, optimizer, ema_shadow)
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(ckpt / "state"), no_dist=not _distributed())
    except CheckpointException as err:  # a BaseException carrying each failing rank's error
        failures = "; ".join(f"rank {rank}: {_first_error(exc)}" for rank, exc in sorted(err.failures.items()))
        raise CheckpointError(f"checkpoint {ckpt} does not match this model: {failures}") from None
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {ckpt} does not match this model: {err}") from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_OPTIM_OPTIONS)
    if ema_shadow is not None:
        with torch.no_grad():
            for name, value in state["ema"].items():
                if ema_shadow[name] is not value:
                    ema_shadow[name].copy_(value)
    data_states = {}
    for file in sorted((ckpt / "data").glob("dp*-of-*.pt")):
        index, _, size = file.stem[2:].partition("-of-")
        data_states[int(index)] = file
        saved_size = int(size)
    data_state = None
    if data_states and saved_size == dp_size and dp_rank in data_states:
        data_state = torch.load(data_states[dp_rank], map_location="cpu", weights_only=True)
    trainer_file = ckpt / "trainer.pt"
    trainer_state = torch.load(trainer_file, map_location="cpu", weights_only=True) if trainer_file.is_file() else None
    return LoadedCheckpoint(path=ckpt, step=int(meta["step"]), meta=meta,
                            config_yaml=(ckpt / "config.yaml").read_text(), trainer_state=trainer_state,
                            data_state=data_state,
                            data_states=data_states)
