"""The on-disk protocol of a checkpoint directory: names, the ``COMPLETE`` marker, atomic rename.

Write protocol (a crash or SIGKILL at any point leaves every earlier checkpoint intact):
1. write every file into ``checkpoints/.tmp-step-XXXXXXXX-<token>/`` (:func:`begin_checkpoint`
   makes it and removes partial directories that a killed save left behind);
2. hash and fsync every file, write the ``COMPLETE`` marker (JSON: step and the sha256 of every
   file) and fsync it;
3. ``rename`` the directory to its final name (atomic on POSIX) and fsync the parent;
4. delete the oldest complete checkpoints beyond ``keep``, each renamed to ``.tmp-prune-*`` first
   (steps 2-4: :func:`complete_checkpoint`).

A directory counts only if it has the marker; loading re-hashes every file, so a checkpoint that was
damaged after it was written gives a clear error instead of a silently wrong resume. What goes
into the directory between steps 1 and 2 is ``distributed.py``'s (see the package docstring).
Plain files only: nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

MARKER = "COMPLETE"
STATE_DIR = "state"
"""The Distributed Checkpoint of model, EMA and optimizer, inside a checkpoint directory."""
DCP_FORMAT = "dcp"
"""``meta.json``'s ``format`` of a checkpoint whose state is a Distributed Checkpoint."""
WEIGHTS_FILE = "model.safetensors"
EMA_WEIGHTS_FILE = "ema.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_REPLACED_DIR = re.compile(r"^\.tmp-old-(step-\d{8,})-")
"""A complete checkpoint moved aside while a re-save of its step takes its name."""


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


def _restore_replaced(root: Path) -> None:
    """Put back a complete checkpoint that a re-save had moved aside (``.tmp-old-step-N-*``) when
    the save was killed before its replacement took the name ``step-N``: otherwise deleting the
    stale ``.tmp-*`` directories would lose step N altogether."""
    restored = False
    for moved in sorted(root.glob(".tmp-old-step-*")):
        match = _REPLACED_DIR.match(moved.name)
        if match and (moved / MARKER).is_file() and not (root / match.group(1)).exists():
            os.rename(moved, root / match.group(1))
            restored = True
    if restored:
        _fsync_dir(root)


def begin_checkpoint(run_dir: str | os.PathLike, step: int, token: str | int) -> Path:
    """Make the empty temporary directory of a checkpoint (one process: the caller shares the path).

    Partial directories of earlier saves (killed before their rename) are deleted first: the
    caller finishes or abandons any save in flight before starting the next.
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _restore_replaced(root)
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
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond ``keep``. Each is first renamed out of the
    ``step-*`` names (atomic once the parent is fsynced), so a crash mid-delete leaves a stale
    ``.tmp-prune-*`` directory for the next save to clean up, never a ``step-*`` directory that
    has its marker but lacks files."""
    doomed = []
    for _, old in complete_checkpoints(root.parent)[:-keep] if keep > 0 else []:
        trash = root / f".tmp-prune-{old.name}-{os.getpid()}"
        os.rename(old, trash)
        doomed.append(trash)
    if doomed:
        _fsync_dir(root)
    for trash in doomed:
        shutil.rmtree(trash, ignore_errors=True)


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
