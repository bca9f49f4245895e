"""Atomic, verifiable checkpoints under ``run.dir/checkpoints/step-XXXXXXXX``.

Write protocol (a crash or SIGKILL at any point leaves every earlier checkpoint intact):
1. write every file into ``checkpoints/.tmp-step-XXXXXXXX-<pid>/`` and fsync it;
2. write the ``COMPLETE`` marker (JSON: step and the sha256 of every file) and fsync it;
3. ``rename`` the directory to its final name (atomic on POSIX) and fsync the parent;
4. delete the oldest complete checkpoints beyond ``keep``.

A directory counts only if it has the marker; loading re-hashes every file, so a checkpoint that was
damaged after it was written gives a clear error instead of a silently wrong resume.

Weights are stored as safetensors (loadable without pickle by any tool); optimizer, RNG and data
state go in ``trainer.pt`` (read with ``weights_only=True``).
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
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"
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


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model_state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor] | None, trainer_state: dict, config_yaml: str,
                    meta: dict, keep: int) -> Path:
    """Write one checkpoint atomically and prune old ones; returns the final directory."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    tmp.mkdir()
    files = {
        "model.safetensors": lambda p: save_file(_contiguous(model_state), str(p)),
        "trainer.pt": lambda p: torch.save(trainer_state, p),
        "config.yaml": lambda p: p.write_text(config_yaml),
        "meta.json": lambda p: p.write_text(json.dumps({**meta, "step": step}, indent=1)),
    }
    if ema_state is not None:
        files["ema.safetensors"] = lambda p: save_file(_contiguous(ema_state), str(p))
    hashes = {}
    for name, write in files.items():
        path = tmp / name
        write(path)
        _fsync_file(path)
        hashes[name] = _sha256(path)
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
    for _, old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


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


def load_checkpoint(ckpt: str | os.PathLike, *, verify: bool = True) -> dict:
    """Read a checkpoint into memory: model, ema (or None), trainer state, config text, meta."""
    ckpt = resolve_checkpoint(ckpt)
    if verify:
        verify_checkpoint(ckpt)
    try:
        out = {
            "path": ckpt,
            "model": load_file(str(ckpt / "model.safetensors")),
            "ema": load_file(str(ckpt / "ema.safetensors")) if (ckpt / "ema.safetensors").is_file() else None,
            "trainer": torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True),
            "config_yaml": (ckpt / "config.yaml").read_text(),
            "meta": json.loads((ckpt / "meta.json").read_text()),
        }
    except CheckpointError:
        raise
    except Exception as err:  # safetensors / pickle / json errors all mean the same to a user
        raise CheckpointError(f"checkpoint {ckpt} cannot be read: {type(err).__name__}: {err}") from None
    return out


def load_inference_model(ckpt: str, *, use_ema: bool = True, device: str = "cpu"):
    """(config, model in eval mode, scheduler) from a checkpoint or run directory."""
    import tempfile

    from ..config import load_config
    from ..diffusion.schedulers import build_scheduler
    from ..model import build_model

    state = load_checkpoint(ckpt)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(state["config_yaml"])
        config_path = f.name
    try:
        cfg = load_config(config_path)
    finally:
        os.unlink(config_path)
    model = build_model(cfg.model, cfg.diffusion, int(state["meta"]["vocab_size"]))
    try:
        model.load_state_dict(state["model"])
        if use_ema and state["ema"] is not None:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in state["ema"].items():
                    params[name].copy_(value)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {state['path']} does not match its config's model: {err}") from None
    model.to(device).eval()
    return cfg, model, build_scheduler(cfg.diffusion)
