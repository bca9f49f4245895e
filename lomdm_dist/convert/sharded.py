"""Sharded training checkpoints (Distributed Checkpoint, any layout) as a conversion source and target.

Reading assembles full tensors from the shards in one process (``load_checkpoint``), whatever
layout wrote them. Writing produces a one-process checkpoint in the trainer's format and with the
same ``COMPLETE`` marker protocol (``save_checkpoint``), which any layout loads. What such a
checkpoint holds:

- ``model`` and ``ema``: both the converted weights (the EMA restarts from them, with its update
  count at 0, so its decay warm-up starts again);
- no optimizer state: AdamW starts fresh when the trainer resumes from it (the trainer says so);
- ``trainer.pt`` with the source's step (0 for an imported model), no data-loader position (the
  reader starts at the beginning of the data) and no per-rank RNG state (a fresh, step-keyed
  dropout stream, as after any layout change).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from ..checkpoint.distributed import save_checkpoint
from ..checkpoint.export import load_checkpoint
from ..checkpoint.protocol import complete_checkpoints
from .portable import (ConversionError, PortableModel, check_tensors, config_from_yaml_text, config_yaml,
                       expected_shapes)


def read_sharded(path: str | os.PathLike, *, weights: str = "auto") -> PortableModel:
    """The raw or EMA weights (``weights``: ``auto`` = EMA when saved) of a checkpoint directory or a
    run directory's latest complete checkpoint, verified against its own config."""
    ckpt = load_checkpoint(path)
    where = ckpt["path"]
    if weights == "auto":
        weights = "ema" if ckpt["ema"] is not None else "raw"
    if weights == "ema" and ckpt["ema"] is None:
        raise ConversionError(f"{where}: the checkpoint holds no EMA weights; use --weights raw")
    tensors = ckpt["ema"] if weights == "ema" else ckpt["model"]
    cfg = config_from_yaml_text(ckpt["config_yaml"], where / "config.yaml")
    meta = ckpt["meta"]
    try:
        vocab_size = int(meta["vocab_size"])
    except (KeyError, TypeError, ValueError):
        raise ConversionError(f"{where}/meta.json: no vocab_size") from None
    check_tensors(tensors, expected_shapes(cfg, vocab_size), where / "state", what=f"{weights} tensor")
    return PortableModel(tensors=tensors, config=cfg, vocab_size=vocab_size,
                         tokenizer=meta.get("tokenizer", cfg.data.tokenizer), weights=weights,
                         step=int(meta.get("step", 0)),
                         source={"format": "sharded", "path": str(where), "layout": meta.get("layout")})


def write_sharded(model: PortableModel, run_dir: str | os.PathLike, *, step: int | None = None) -> Path:
    """Write ``run_dir/checkpoints/step-XXXXXXXX/`` (see the module docstring); returns that directory.

    ``run_dir`` must not hold checkpoints yet: the trainer resumes from a run directory's newest one,
    and writing next to a run's own checkpoints would silently change what it resumes from.
    """
    run_dir = Path(run_dir)
    existing = complete_checkpoints(run_dir)
    if existing:
        raise ConversionError(f"{run_dir}: already holds checkpoints (newest {existing[-1][1].name}); "
                              f"write the converted checkpoint into a new run directory")
    step = model.step if step is None else step
    cfg = copy.deepcopy(model.config)
    cfg.run.dir = str(run_dir)
    weights = {name: value.detach().float().contiguous() for name, value in model.tensors.items()}
    ema = {name: value.clone() for name, value in weights.items()}
    meta = {"vocab_size": model.vocab_size, "tokenizer": model.tokenizer, "scheduler": cfg.diffusion.scheduler,
            "weights_only": True, "converted_from": {**model.source, "weights": model.weights}}
    trainer_state = {"step": step, "ema_num_updates": 0, "nonfinite_total": 0, "nonfinite_in_row": 0}
    return save_checkpoint(run_dir, step, model_state=weights, ema_state=ema, trainer_state=trainer_state,
                           config_yaml=config_yaml(cfg), meta=meta, keep=0)
