"""Consolidated weights: one ``model.safetensors`` (full tensors by parameter name) and ``config.json``.

``config.json`` holds what rebuilds the model without this project's checkpoint machinery:

- ``format`` (``lomdm-consolidated``) and ``format_version``;
- ``model`` and ``diffusion``: the config sections ``build_model`` takes;
- ``vocab_size`` (mask token included), ``mask_token_id`` (``vocab_size - 1``), ``tokenizer``;
- ``weights`` (``ema`` or ``raw``) and ``step`` of the source;
- ``training_config``: the full training config the weights came with (data, optimizer, schedule),
  used when the weights go back into a sharded checkpoint;
- ``source``: provenance (path and format of what was converted).

Files are written under a temporary name and renamed, so a reader never sees half a file; the
weights go first, so a ``config.json`` next to them means the pair is complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import config_to_dict
from ..diffusion.schedulers import build_scheduler
from ..model import build_model
from .portable import (ConversionError, PortableModel, check_tensors, config_from_dict, expected_shapes,
                       resolve_file)

FORMAT = "lomdm-consolidated"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def _replace_atomically(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def consolidated_config(model: PortableModel) -> dict:
    cfg = model.config
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "vocab_size": model.vocab_size,
            "mask_token_id": model.vocab_size - 1, "tokenizer": model.tokenizer, "weights": model.weights,
            "step": model.step, "model": asdict(cfg.model), "diffusion": asdict(cfg.diffusion),
            "training_config": config_to_dict(cfg), "source": model.source}


def write_consolidated(model: PortableModel, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().contiguous() for name, value in model.tensors.items()}
    weights_path, config_path = out / WEIGHTS_FILE, out / CONFIG_FILE
    _replace_atomically(weights_path, lambda p: save_file(tensors, str(p), metadata={"format": "pt",
                                                                                     "weights": model.weights}))
    text = json.dumps(consolidated_config(model), indent=1)
    _replace_atomically(config_path, lambda p: p.write_text(text + "\n"))
    return [weights_path, config_path]


def _locate(path: str | os.PathLike) -> tuple[Path, Path]:
    p = resolve_file(path)
    if p.is_dir():
        return p / WEIGHTS_FILE, p / CONFIG_FILE
    return p, p.with_name(CONFIG_FILE)


def read_consolidated(path: str | os.PathLike) -> PortableModel:
    """A consolidated directory (or its ``.safetensors`` file, with ``config.json`` beside it)."""
    weights_path, config_path = _locate(path)
    for required in (config_path, weights_path):
        if not required.is_file():
            raise ConversionError(f"{required}: missing (a consolidated checkpoint is {WEIGHTS_FILE} + {CONFIG_FILE})")
    try:
        info = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise ConversionError(f"{config_path}: unreadable JSON ({err})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ConversionError(f"{config_path}: not a {FORMAT} config (format is "
                              f"{info.get('format') if isinstance(info, dict) else None!r})")
    if int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise ConversionError(f"{config_path}: format_version {info['format_version']} is newer than this code "
                              f"reads ({FORMAT_VERSION})")
    for key in ("vocab_size", "model", "diffusion", "weights"):
        if key not in info:
            raise ConversionError(f"{config_path}: missing key {key}")
    tree = dict(info.get("training_config") or {})
    tree["model"], tree["diffusion"] = info["model"], info["diffusion"]
    if info.get("tokenizer") is not None:
        tree.setdefault("data", {})
        tree["data"] = {**tree["data"], "tokenizer": info["tokenizer"]}
    cfg = config_from_dict(tree, config_path)
    vocab_size = int(info["vocab_size"])
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ConversionError(f"{weights_path}: not a readable safetensors file ({err})") from None
    check_tensors(tensors, expected_shapes(cfg, vocab_size), weights_path)
    return PortableModel(tensors=tensors, config=cfg, vocab_size=vocab_size, tokenizer=info.get("tokenizer"),
                         weights=str(info["weights"]), step=int(info.get("step", 0)),
                         source={"format": "consolidated", "path": str(weights_path.parent),
                                 "converted_from": info.get("source")})


def load_consolidated_model(path: str | os.PathLike, *, device: str = "cpu"):
    """(config, model in eval mode, scheduler) from a consolidated directory, in one process."""
    portable = read_consolidated(path)
    model = build_model(portable.config.model, portable.config.diffusion, portable.vocab_size)
    model.load_state_dict(portable.tensors, strict=True)
    model.to(device).eval()
    return portable.config, model, build_scheduler(portable.config.diffusion)

