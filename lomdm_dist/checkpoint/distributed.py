"""Writing and loading a checkpoint's state with every rank, through Distributed Checkpoint (DCP).

Every rank writes its own shards of the model, the EMA and the optimizer state into ``state/``;
DCP's metadata records which global slice each shard is, so the checkpoint loads into any other
layout: the target model's own DTensors say which slices each rank reads. One process is the
same code without a process group. The directory, marker and rename are ``protocol.py``'s:

1. rank 0 makes ``checkpoints/.tmp-step-XXXXXXXX-<token>`` and shares its path; every rank writes
   its DCP shards and its RNG state (``ranks/rank<r>-of-<world>.pt``); each data-parallel slice's
   first rank adds the slice's data-loader state (``data/dp<i>-of-<n>.pt``);
2. after a barrier rank 0 writes ``trainer.pt``, ``config.yaml`` and ``meta.json`` (step, layout),
   optionally the consolidated safetensors copy of the weights (``export_weights``, the trainer's
   ``train.export_safetensors``; see ``export.py``), then hashes everything into the ``COMPLETE``
   marker, renames and prunes; a final barrier lets no rank run ahead of the rename.

``async_save`` (worth it on GPU) returns a :class:`PendingCheckpoint` whose ``finish()`` waits for
the background write and then runs step 2; until then the directory is not complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from .export import export_consolidated
from .protocol import (DCP_FORMAT, STATE_DIR, CheckpointError, begin_checkpoint, checkpoint_root, complete_checkpoint,
                       read_meta, resolve_checkpoint, step_dir_name, verify_checkpoint)
from .shards import single_process_quiet

_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _from_rank0(value: Any) -> Any:
    """``value`` as rank 0 has it, on every rank (a small picklable object)."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_on_rank0(work: Callable[[], Any], failure: str) -> Any:
    """``work()``'s result as rank 0 computes it, on every rank; if it raises, every rank raises.

    Without this, an error on rank 0 alone (disk full, permissions, a failed export) would leave
    the other ranks waiting in the broadcast until the collective timeout, and the job would die
    with a timeout instead of the real error. ``failure`` starts the message (name the path).
    """
    outcome: tuple[bool, Any] | None = None
    cause = None
    if _rank() == 0:
        try:
            outcome = (True, work())
        except Exception as err:  # any failure: the other ranks must hear of it, whatever it is
            outcome, cause = (False, f"{type(err).__name__}: {err}"), err
    ok, value = _from_rank0(outcome)
    if not ok:
        raise CheckpointError(f"{failure} (on rank 0): {value}") from cause
    return value


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
class _Completion:
    """What rank 0 writes once every rank's shards are on disk (step 2 of the module docstring)."""

    tmp: Path
    step: int
    trainer_state: dict | None
    config_yaml: str
    meta: dict
    keep: int
    export_weights: bool = False

    def run(self) -> Path:
        _barrier()
        final = _run_on_rank0(self._write, f"checkpoint {self.tmp} of step {self.step} could not be completed")
        _barrier()
        return final

    def _write(self) -> Path:
        """Rank 0's part: the shared files, the marker, the rename and the pruning."""
        if self.trainer_state is not None:
            torch.save(self.trainer_state, self.tmp / "trainer.pt")
        (self.tmp / "config.yaml").write_text(self.config_yaml)
        meta = {**self.meta, "step": self.step, "format": DCP_FORMAT}
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if self.export_weights:
            export_consolidated(self.tmp, self.tmp)
        return complete_checkpoint(self.tmp, self.step, keep=self.keep)


@dataclass
class PendingCheckpoint:
    """An asynchronous save in flight; ``finish()`` completes it (all ranks must call it)."""

    future: Future | None
    completion: _Completion

    def finish(self) -> Path:
        if self.future is not None:
            self.future.result()
        return self.completion.run()


def save_distributed_checkpoint(run_dir: str | os.PathLike, step: int, *, model: nn.Module,
                                optimizer: torch.optim.Optimizer | None = None,
                                ema_shadow: dict[str, torch.Tensor] | None = None, data_state: Any = None,
                                dp_rank: int = 0, dp_size: int = 1, write_data_state: bool = True,
                                rank_state: dict | None = None, trainer_state: dict | None = None,
                                config_yaml: str = "", meta: dict | None = None,
                                layout: CheckpointLayout | None = None, keep: int = 3,
                                async_save: bool = False, export_weights: bool = False) -> Path | PendingCheckpoint:
    """Write one checkpoint with every rank (collective); returns the final directory.

    ``data_state``: this rank's data-loader state, written once per data-parallel slice (by the
    ranks with ``write_data_state`` True, i.e. tp rank 0 of pipeline stage 0). ``rank_state``:
    what only this rank knows (its RNG state). ``trainer_state``: step, EMA update count,
    counters... (the same on every rank; rank 0 writes ``trainer.pt``). ``export_weights``: also
    write the consolidated safetensors copy of the weights (see the module docstring).
    """
    return write_checkpoint(run_dir, step, training_state(model, optimizer, ema_shadow), data_state=data_state,
                            dp_rank=dp_rank, dp_size=dp_size, write_data_state=write_data_state,
                            rank_state=rank_state, trainer_state=trainer_state, config_yaml=config_yaml, meta=meta,
                            layout=layout, keep=keep, async_save=async_save, export_weights=export_weights)


def write_checkpoint(run_dir: str | os.PathLike, step: int, state: dict[str, Any], *, data_state: Any = None,
                     dp_rank: int = 0, dp_size: int = 1, write_data_state: bool = True,
                     rank_state: dict | None = None, trainer_state: dict | None = None, config_yaml: str = "",
                     meta: dict | None = None, layout: CheckpointLayout | None = None, keep: int = 3,
                     async_save: bool = False, export_weights: bool = False) -> Path | PendingCheckpoint:
    """:func:`save_distributed_checkpoint` for a ready DCP state dict (``model``, optionally ``ema``
    and ``optimizer``, each keyed by parameter name; plain tensors or DTensors)."""
    tmp = _run_on_rank0(lambda: begin_checkpoint(run_dir, step, os.getpid()),
                        f"checkpoint {checkpoint_root(run_dir) / step_dir_name(step)} could not be started")
    if data_state is not None and write_data_state:
        (tmp / "data").mkdir(exist_ok=True)
        torch.save(data_state, tmp / "data" / f"dp{dp_rank}-of-{dp_size}.pt")
    if rank_state is not None:
        (tmp / "ranks").mkdir(exist_ok=True)
        torch.save(rank_state, tmp / "ranks" / f"rank{_rank()}-of-{_world_size()}.pt")
    full_meta = dict(meta or {})
    full_meta["layout"] = asdict(layout or CheckpointLayout(world_size=_world_size()))
    completion = _Completion(tmp, step, trainer_state, config_yaml, full_meta, keep, export_weights)
    writer = tmp / STATE_DIR
    if async_save:
        with single_process_quiet():
            future = dcp.async_save(state, checkpoint_id=str(writer), no_dist=not _distributed())
        if not isinstance(future, Future):  # AsyncSaveResponse in newer releases
            future = future.upload_completion
        return PendingCheckpoint(future, completion)
    with single_process_quiet():
        dcp.save(state, checkpoint_id=str(writer), no_dist=not _distributed())
    return completion.run()


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model_state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor] | None, trainer_state: dict, config_yaml: str,
                    meta: dict, keep: int, export_weights: bool = False) -> Path:
    """A one-process checkpoint from plain state dicts (full tensors by name), in the format the
    trainer writes, e.g. to package weights trained elsewhere; it loads into any layout."""
    state = {"model": dict(model_state), **({"ema": dict(ema_state)} if ema_state is not None else {})}
    return write_checkpoint(run_dir, step, state, trainer_state=trainer_state, config_yaml=config_yaml, meta=meta,
                            keep=keep, export_weights=export_weights)


def _first_error(failure: Any) -> str:
    """DCP records a failure as (exception, traceback summary); keep the exception's text."""
    exc = failure[0] if isinstance(failure, tuple) and failure else failure
    return f"{type(exc).__name__}: {exc}"


def _per_index_files(folder: Path, stem: str) -> tuple[dict[int, Path], int | None]:
    """``<stem><i>-of-<n>.pt`` files of ``folder`` by index, and their ``n``."""
    files, size = {}, None
    for file in sorted(folder.glob(f"{stem}*-of-*.pt")):
        index, _, count = file.stem[len(stem):].partition("-of-")
        files[int(index)] = file
        size = int(count)
    return files, size


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
    rank_state: dict | None
    """This rank's own saved state (RNG) when the layout is unchanged, else None."""


def _verify_on_rank0(ckpt: Path) -> None:
    """Rank 0 re-hashes the files; every rank raises the same error if one is damaged."""
    error = None
    if _rank() == 0:
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as err:
            error = str(err)
        except OSError as err:          # unreadable files: every rank must hear it, not wait in the broadcast
            error = f"checkpoint {ckpt} cannot be read: {type(err).__name__}: {err}"
    error = _from_rank0(error)
    if error is not None:
        raise CheckpointError(error)


def load_distributed_checkpoint(path: str | os.PathLike, *, model: nn.Module,
                                optimizer: torch.optim.Optimizer | None = None,
                                ema_shadow: dict[str, torch.Tensor] | None = None, dp_rank: int = 0,
                                dp_size: int = 1, layout: CheckpointLayout | None = None,
                                verify: bool = True) -> LoadedCheckpoint:
    """Load a checkpoint (or a run directory's latest) into this rank's model part, in place.

    Works in any layout and without a process group. ``ema_shadow`` tensors are filled in place.
    ``layout``: this run's layout, to tell whether the saved per-rank states apply.
    """
    ckpt = resolve_checkpoint(path)
    if verify:
        _verify_on_rank0(ckpt)
    meta = read_meta(ckpt)
    if meta.get("format") != DCP_FORMAT:
        raise CheckpointError(f"checkpoint {ckpt} is not a distributed (DCP) checkpoint (meta.json has format "
                              f"{meta.get('format')!r}); it was written by an older version of this code")
    state = training_state(model, optimizer, ema_shadow)
    try:
        with single_process_quiet():
            dcp.load(state, checkpoint_id=str(ckpt / STATE_DIR), no_dist=not _distributed())
    except CheckpointException as err:  # a BaseException carrying each failing rank's error
        failures = "; ".join(f"rank {rank}: {_first_error(exc)}" for rank, exc in sorted(err.failures.items()))
        raise CheckpointError(f"checkpoint {ckpt} does not match this model: {failures}") from None
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {ckpt} does not match this model: {err}") from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_OPTIM_OPTIONS)
    if ema_shadow is not None:
        with torch.no_grad():
            for name, value in state["ema"].items():
                if ema_shadow[name] is not value:
                    ema_shadow[name].copy_(value)
    data_states, saved_dp = _per_index_files(ckpt / "data", "dp")
    data_state = None
    if saved_dp == dp_size and dp_rank in data_states:
        data_state = torch.load(data_states[dp_rank], map_location="cpu", weights_only=True)
    rank_state = None
    current = asdict(layout or CheckpointLayout(world_size=_world_size()))
    rank_files, _ = _per_index_files(ckpt / "ranks", "rank")
    if meta.get("layout") == current and _rank() in rank_files:
        rank_state = torch.load(rank_files[_rank()], map_location="cpu", weights_only=True)
    trainer_file = ckpt / "trainer.pt"
    trainer_state = torch.load(trainer_file, map_location="cpu", weights_only=True) if trainer_file.is_file() else None
    return LoadedCheckpoint(path=ckpt, step=int(meta["step"]), meta=meta,
                            config_yaml=(ckpt / "config.yaml").read_text(), trainer_state=trainer_state,
                            data_state=data_state, data_states=data_states, rank_state=rank_state)
