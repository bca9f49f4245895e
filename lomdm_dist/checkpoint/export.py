"""The consolidated view of a checkpoint and its safetensors export;
``python -m lomdm_dist.checkpoint.export CKPT [--out DIR]``.

Checkpoints keep the weights once, as Distributed Checkpoint shards (``state/``); this code base
reads them directly (:func:`load_checkpoint`: full tensors by name, in memory). Tools outside it
often want one plain file per weight set: :func:`export_safetensors` writes ``model.safetensors``
and, when the checkpoint has an EMA, ``ema.safetensors`` (full tensors keyed by parameter name,
whatever layout trained the model). On the command line ``CKPT`` is a checkpoint directory or a
run directory (its latest complete checkpoint); ``--out`` defaults to the checkpoint directory.
Exit status 2 with a one-line reason when the checkpoint is missing, incomplete or damaged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .protocol import (EMA_WEIGHTS_FILE, STATE_DIR, WEIGHTS_FILE, CheckpointError, resolve_checkpoint,
                       verify_checkpoint)
from .shards import full_tensors, saved_parts


def export_consolidated(ckpt: Path, out_dir: Path) -> list[Path]:
    """Write the consolidated ``model.safetensors`` (and ``ema.safetensors`` when an EMA was saved)
    of the shards of checkpoint directory ``ckpt`` into ``out_dir``; returns the files written.

    Each file is written under a temporary name and renamed, so a reader never sees half a file.
    No verification: the writer calls it on a checkpoint it is completing.
    """
    written = []
    for prefix, name in (("model", WEIGHTS_FILE), ("ema", EMA_WEIGHTS_FILE)):
        tensors = full_tensors(ckpt / STATE_DIR, prefix)
        if tensors:
            target = out_dir / name
            tmp = out_dir / f".{name}.{os.getpid()}.tmp"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            os.replace(tmp, target)
            written.append(target)
    return written


def export_safetensors(ckpt: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``model.safetensors`` (and ``ema.safetensors`` when the checkpoint has an EMA) for a
    checkpoint or a run directory's latest one; returns the files.

    ``out_dir`` defaults to the checkpoint directory itself (the files are not part of its
    ``COMPLETE`` marker, so the checkpoint stays valid, and pruning removes them with it). The
    checkpoint is verified first, so a damaged one is not exported.
    """
    ckpt = resolve_checkpoint(ckpt)
    verify_checkpoint(ckpt)
    out = Path(out_dir) if out_dir is not None else ckpt
    out.mkdir(parents=True, exist_ok=True)
    try:
        return export_consolidated(ckpt, out)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {ckpt} cannot be exported: {type(err).__name__}: {err}") from None


def load_checkpoint(ckpt: str | os.PathLike, *, verify: bool = True) -> dict:
    """The consolidated view of a checkpoint, in memory: full model and EMA weights by name (EMA
    None when absent), assembled from the Distributed Checkpoint shards in this one process, the
    trainer state (None when the writer gave none: ``trainer.pt`` is optional), the config text and
    meta."""
    ckpt = resolve_checkpoint(ckpt)
    if verify:
        verify_checkpoint(ckpt)
    try:
        parts = saved_parts(ckpt / STATE_DIR)
        out = {
            "path": ckpt,
            "model": full_tensors(ckpt / STATE_DIR, "model"),
            "ema": full_tensors(ckpt / STATE_DIR, "ema") if "ema" in parts else None,
            "trainer": (torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
                        if (ckpt / "trainer.pt").is_file() else None),
            "config_yaml": (ckpt / "config.yaml").read_text(),
            "meta": json.loads((ckpt / "meta.json").read_text()),
        }
    except Exception as err:  # DCP / pickle / json errors all mean the same to a user
        raise CheckpointError(f"checkpoint {ckpt} cannot be read: {type(err).__name__}: {err}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lomdm_dist.checkpoint.export",
                                     description="Consolidated safetensors weights of a checkpoint, on demand.")
    parser.add_argument("ckpt", help="checkpoint directory or run directory")
    parser.add_argument("--out", default=None, help="output directory (default: the checkpoint directory)")
    args = parser.parse_args(argv)
    try:
        files = export_safetensors(args.ckpt, args.out)
    except (CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in files:
        print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
