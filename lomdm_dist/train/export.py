"""``python -m lomdm_dist.train.export CKPT [--out DIR]``: consolidated safetensors weights on demand.

Checkpoints keep the weights once, as Distributed Checkpoint shards (``state/``); this code base
reads them directly. Tools outside it often want one plain file per weight set: this writes
``model.safetensors`` and, when the checkpoint has an EMA, ``ema.safetensors`` (full tensors keyed
by parameter name, whatever layout trained the model). ``CKPT`` is a checkpoint directory or a run
directory (its latest complete checkpoint); ``--out`` defaults to the checkpoint directory.
Exit status 2 with a one-line reason when the checkpoint is missing, incomplete or damaged.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lomdm_dist.train.export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="checkpoint directory or run directory")
    parser.add_argument("--out", default=None, help="output directory (default: the checkpoint directory)")
    args = parser.parse_args(argv)

    from .checkpoint import CheckpointError, export_safetensors
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
