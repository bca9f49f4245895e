"""Convert model checkpoints between this project's formats and import MDLM checkpoints.

    python tools/convert_checkpoint.py SRC OUT [--from auto|sharded|consolidated|mdlm] [--to consolidated|sharded]

Sources (``--from``, detected by default): ``sharded``, a training checkpoint directory or a run
directory (its latest complete checkpoint), written in any layout; ``consolidated``, a directory
with ``model.safetensors`` + ``config.json`` (what this tool writes); ``mdlm``, a kuleshov-group/mdlm
Lightning ``.ckpt``, a plain state dict (``.pt`` / ``.bin``) or a ``.safetensors`` file.

Targets (``--to``): ``consolidated`` (default, except from a consolidated source) writes
``OUT/model.safetensors`` and ``OUT/config.json``; ``sharded`` writes a weights-only training
checkpoint ``OUT/checkpoints/step-XXXXXXXX/`` that the trainer resumes from (run.dir=OUT; fresh
optimizer, EMA restarted from the weights) and any layout loads. ``--config`` gives the training
config to embed (its model and diffusion sections are replaced by the converted model's).

Exit status 2 with a one-line reason for bad arguments or a wrong, truncated or incompatible file.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from ..config import ConfigError, load_config
from ..checkpoint.protocol import MARKER, CheckpointError
from .consolidated import CONFIG_FILE, FORMAT, read_consolidated, write_consolidated
from .mdlm import import_mdlm
from .portable import ConversionError, PortableModel
from .sharded import read_sharded, write_sharded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0],
                                     epilog="See docs/mdlm-import.md for the MDLM parameter mapping.")
    parser.add_argument("src", help="checkpoint / run directory, consolidated directory, or MDLM file")
    parser.add_argument("out", help="output directory (consolidated) or run directory (sharded)")
    parser.add_argument("--from", dest="source", choices=("auto", "sharded", "consolidated", "mdlm"), default="auto")
    parser.add_argument("--to", dest="target", choices=("consolidated", "sharded"), default=None,
                        help="default: sharded from a consolidated source, else consolidated")
    parser.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                        help="which weights of the source: EMA or raw (auto: EMA when the source has one)")
    parser.add_argument("--config", default=None,
                        help="training config YAML to embed (model/diffusion come from the source)")
    parser.add_argument("--step", type=int, default=None, help="step of the written sharded checkpoint "
                        "(default: the source's; 0 for an MDLM import)")
    mdlm = parser.add_argument_group("MDLM import (--from mdlm)")
    mdlm.add_argument("--scheduler", choices=("lomdm", "mdlm", "poly", "arm", "block"), default="lomdm",
                      help="lomdm (default): phi/psi heads initialised fresh, so every exponent is k = c1 "
                           "and an evaluation straight after the import is the NELBO of the schedule t^c1, not "
                           "MDLM's (fine-tune first, or use --scheduler mdlm to reproduce MDLM's numbers); "
                           "mdlm (or another fixed one): no heads")
    mdlm.add_argument("--n-heads", type=int, default=None,
                      help="attention heads (read from rotary_emb.inv_freq or the .ckpt's config when present)")
    mdlm.add_argument("--rope-base", type=float, default=None, help="rotary base (default: model.rope_base, 10000)")
    mdlm.add_argument("--tokenizer", default="gpt2",
                      help="tokenizer of the MDLM model (checked against the embedding size); 'none' skips the check")
    mdlm.add_argument("--seed", type=int, default=0, help="seed of the fresh phi/psi heads")
    return parser


def detect_source(path: Path) -> str:
    if path.is_dir():
        if (path / MARKER).is_file() or (path / "checkpoints").is_dir() or path.name.startswith("step-"):
            return "sharded"
        if (path / CONFIG_FILE).is_file():
            return "consolidated"
        raise ConversionError(f"{path}: neither a checkpoint / run directory nor a consolidated directory "
                              f"(no {MARKER}, checkpoints/ or {CONFIG_FILE}); pass --from")
    config = path.with_name(CONFIG_FILE)
    if path.suffix == ".safetensors" and config.is_file():
        try:
            if json.loads(config.read_text()).get("format") == FORMAT:
                return "consolidated"
        except (OSError, ValueError, AttributeError):
            pass                    # an unreadable or foreign config.json: the file is not ours, so MDLM's
    return "mdlm"


def _tokenizer_size(name: str) -> int:
    from data_pipeline.tokenizers import get_tokenizer
    try:
        return int(get_tokenizer(name).vocab_size)
    except Exception as err:  # DataError, missing files: say which tokenizer
        raise ConversionError(f"tokenizer {name!r} cannot be loaded to check the vocabulary ({err}); "
                              f"pass --tokenizer none to skip the check") from None


def _with_training_config(model: PortableModel, cfg) -> PortableModel:
    """``cfg`` with the model's own model/diffusion sections and tokenizer."""
    cfg = copy.deepcopy(cfg)
    cfg.model, cfg.diffusion = copy.deepcopy(model.config.model), copy.deepcopy(model.config.diffusion)
    if model.tokenizer is not None:
        cfg.data.tokenizer = model.tokenizer
    model.config = cfg.validate()
    return model


def convert(args: argparse.Namespace) -> list[Path]:
    src = Path(args.src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or directory")
    kind = detect_source(src) if args.source == "auto" else args.source
    target = args.target or ("sharded" if kind == "consolidated" else "consolidated")
    base = load_config(args.config) if args.config else None
    if kind == "mdlm":
        tokenizer = None if args.tokenizer == "none" else args.tokenizer
        model = import_mdlm(src, weights=args.weights, scheduler=args.scheduler, n_heads=args.n_heads,
                            rope_base=args.rope_base, tokenizer=tokenizer,
                            tokenizer_vocab_size=_tokenizer_size(tokenizer) if tokenizer else None,
                            base_config=base, seed=args.seed)
    else:
        if args.n_heads is not None or args.rope_base is not None:
            raise ConversionError("--n-heads and --rope-base apply to --from mdlm only")
        if kind == "sharded":
            model = read_sharded(src, weights=args.weights)
        else:
            model = read_consolidated(src)
            if args.weights not in ("auto", model.weights):
                raise ConversionError(f"{src}: holds {model.weights} weights only, --weights {args.weights} asked")
        if base is not None:
            model = _with_training_config(model, base)
    if target == "sharded":
        return [write_sharded(model, args.out, step=args.step)]
    if args.step is not None:
        model.step = args.step
    return write_consolidated(model, args.out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = convert(args)
    except (ConversionError, CheckpointError, ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0
