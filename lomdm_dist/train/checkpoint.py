"""Atomic, verifiable checkpoints under ``run.dir/checkpoints/step-XXXXXXXX``: the protocol.

Write protocol (a crash or SIGKILL at any point leaves every earlier checkpoint intact):
1. write every file into ``checkpoints/.tmp-step-XXXXXXXX-<token>/`` (:func:`begin_checkpoint`
   makes it and removes partial directories that a killed save left behind);
2. hash and fsync every file, write the ``COMPLETE`` marker (JSON: step and the sha256 of every
   file) and fsync it;
3. ``rename`` the directory to its final name (atomic on POSIX) and fsync the parent;
4. delete the oldest complete checkpoints beyond ``keep`` (steps 2-4: :func:`complete_checkpoint`).

A directory counts only if it has the marker; loading re-hashes every file, so a checkpoint that was
damaged after it was written gives a clear error instead of a silently wrong resume.

What goes into the directory is written by ``lomdm_dist.parallel.checkpoint`` (the same format for
one process and for any layout): the training state as a Distributed Checkpoint under ``state/``
(model, EMA and optimizer, sharded and reshardable), the data-loader state of each data-parallel
slice under ``data/``, each rank's RNG state under ``ranks/``, ``trainer.pt`` (step, counters),
``config.yaml`` and ``meta.json``. The weights are stored once, in ``state/``: a second, consolidated
copy would double every checkpoint's size. :func:`load_checkpoint` (full tensors by name) and
:func:`load_inference_model` (a ready model) assemble them from the shards in one process, whatever
layout wrote them. For tools that want plain files, :func:`export_safetensors` (``python -m
lomdm_dist.train.export``) writes ``model.safetensors`` / ``ema.safetensors`` on demand, and
``train.export_safetensors=true`` makes the trainer write them into every checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

MARKER = "COMPLETE"
WEIGHTS_FILE = "model.safetensors"
EMA_WEIGHTS_FILE = "ema.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message names the path."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint with a marker, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (its latest complete checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path does not exist: {p}")
    if (p / MARKER).is_file():
        return p
    if _STEP_DIR.match(p.name):
        raise CheckpointError(f"checkpoint {p} is incomplete (no {MARKER} marker): it was interrupted while being written")
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"no complete checkpoint found in {p} (looked in {checkpoint_root(p)})")
    return latest


def begin_checkpoint(run_dir: str | os.PathLike, step: int, token: str | int) -> Path:
    """Make the empty temporary directory of a checkpoint (one process: the caller shares the path).

    Partial directories of earlier saves (killed before their rename) are deleted first: the
    caller finishes or abandons any save in flight before starting the next.
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{step_dir_name(step)}-{token}"
    tmp.mkdir()
    return tmp


def complete_checkpoint(tmp: Path, step: int, *, keep: int) -> Path:
    """Steps 2-4 of the protocol for the fully written ``tmp``; returns the final directory."""
    root = tmp.parent
    final = root / step_dir_name(step)
    hashes = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync_file(path)
        hashes[str(path.relative_to(tmp))] = _sha256(path)
    marker = tmp / MARKER
    marker.write_text(json.dumps({"step": step, "time": time.time(), "sha256": hashes}, indent=1))
    _fsync_file(marker)
    if final.exists():  # re-saving a step (e.g. after a resume): replace it atomically enough
        trash = root / f".tmp-old-{step_dir_name(step)}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    for _, old in complete_checkpoints(root.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model_state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor] | None, trainer_state: dict, config_yaml: str,
                    meta: dict, keep: int, export_weights: bool = False) -> Path:
    """A one-process checkpoint from plain state dicts (full tensors by name), in the format the
    trainer writes, e.g. to package weights trained elsewhere; it loads into any layout."""
    from ..parallel.checkpoint import write_checkpoint

    state = {"model": dict(model_state), **({"ema": dict(ema_state)} if ema_state is not None else {})}
    return write_checkpoint(run_dir, step, state, trainer_state=trainer_state, config_yaml=config_yaml, meta=meta,
                            keep=keep, export_weights=export_weights)


def verify_checkpoint(ckpt: Path) -> dict:
    """Check the marker and every file's hash; returns the marker's content."""
    marker = ckpt / MARKER
    try:
        info = json.loads(marker.read_text())
        hashes = info["sha256"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {ckpt}: unreadable {MARKER} marker ({err})") from None
    for name, expected in hashes.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: file {name} is missing")
        if _sha256(path) != expected:
            raise CheckpointError(f"checkpoint {ckpt}: file {name} is corrupt (sha256 mismatch); "
                                  f"delete this checkpoint directory to resume from an earlier one")
    return info


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {ckpt}: unreadable meta.json ({err})") from None


def load_checkpoint(ckpt: str | os.PathLike, *, verify: bool = True) -> dict:
    """The consolidated view of a checkpoint, in memory: full model and EMA weights by name (EMA
    None when absent), assembled from the Distributed Checkpoint shards in this one process, the
    trainer state, the config text and meta."""
    from ..parallel.checkpoint import STATE_DIR, full_tensors, saved_parts

    ckpt = resolve_checkpoint(ckpt)
    if verify:
        verify_checkpoint(ckpt)
    try:
        parts = saved_parts(ckpt / STATE_DIR)
        out = {
            "path": ckpt,
            "model": full_tensors(ckpt / STATE_DIR, "model"),
            "ema": full_tensors(ckpt / STATE_DIR, "ema") if "ema" in parts else None,
            "trainer": torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True),
            "config_yaml": (ckpt / "config.yaml").read_text(),
            "meta": json.loads((ckpt / "meta.json").read_text()),
        }
    except Exception as err:  # DCP / pickle / json errors all mean the same to a user
        raise CheckpointError(f"checkpoint {ckpt} cannot be read: {type(err).__name__}: {err}") from None
    return out


def export_safetensors(ckpt: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``model.safetensors`` (and ``ema.safetensors`` when the checkpoint has an EMA) for a
    checkpoint or a run directory's latest one; returns the files.

    ``out_dir`` defaults to the checkpoint directory itself (the files are not part of its
    ``COMPLETE`` marker, so the checkpoint stays valid, and pruning removes them with it). The
    checkpoint is verified first, so a damaged one is not exported.
    """
    from ..parallel.checkpoint import export_consolidated

    ckpt = resolve_checkpoint(ckpt)
    verify_checkpoint(ckpt)
    out = Path(out_dir) if out_dir is not None else ckpt
    out.mkdir(parents=True, exist_ok=True)
    try:
        return export_consolidated(ckpt, out)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {ckpt} cannot be exported: {type(err).__name__}: {err}") from None


def load_inference_model(ckpt: str, *, use_ema: bool = True, device: str = "cpu"):
    """(config, model in eval mode, scheduler) from a checkpoint or run directory, in one process.

    The weights come from the sharded training state, whatever layout wrote it (the engine's
    loader reshards it into this plain model).
    """
    import tempfile

    from ..config import load_config
    from ..diffusion.schedulers import build_scheduler
    from ..model import build_model
    from ..parallel.checkpoint import STATE_DIR, load_distributed_checkpoint, saved_parts

    path = resolve_checkpoint(ckpt)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write((path / "config.yaml").read_text())
        config_path = f.name
    try:
        cfg = load_config(config_path)
    finally:
        os.unlink(config_path)
    model = build_model(cfg.model, cfg.diffusion, int(read_meta(path)["vocab_size"]))
    params = dict(model.named_parameters())
    has_ema = use_ema and "ema" in saved_parts(path / STATE_DIR)
    shadow = {name: torch.empty_like(p, dtype=torch.float32) for name, p in params.items()} if has_ema else None
    load_distributed_checkpoint(path, model=model, ema_shadow=shadow)
    if shadow is not None:
        with torch.no_grad():
            for name, value in shadow.items():
                params[name].copy_(value)
    model.to(device).eval()
    return cfg, model, build_scheduler(cfg.diffusion)
