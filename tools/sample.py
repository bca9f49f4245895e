"""Sample text from a trained checkpoint and write it as JSON lines.

    python tools/sample.py --ckpt runs/smoke --num 8 --steps 128 --out samples.jsonl

``--ckpt`` is a checkpoint directory or a run directory (its latest complete checkpoint). Each output
line holds ``text``, ``tokens``, ``order`` (the step at which each position was unmasked; ``steps``
for the final argmax), ``entropy`` (unigram token entropy of the sample, nats) and ``provenance``,
the same object on every line, so that a sample can be traced and reproduced on its own:
``checkpoint`` (the resolved checkpoint directory), ``step`` (its training step), ``weights``
(``ema``, or ``raw`` with ``--no-ema`` or when the checkpoint holds no EMA), ``seed``, ``steps``,
``t_min``, ``num``, ``seq_len``, ``batch_size`` (rows per batch: the draws depend on it),
``final_argmax``, ``reverse_c2_zero``, ``scheduler``, ``tokenizer`` and ``device`` (CPU and CUDA
generators draw differently). A summary with the number of network calls goes to stderr. The
sampling itself lives in ``lomdm_dist.diffusion.sampler``; this file only parses arguments, loads
and writes. Bad arguments, an unusable checkpoint or an unwritable output exit with status 2 and a
one-line reason.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory or run directory")
    parser.add_argument("--out", required=True, help="output .jsonl file (written atomically)")
    parser.add_argument("--num", type=int, default=None, help="number of samples (default: sample.num)")
    parser.add_argument("--steps", type=int, default=None, help="reverse steps (default: sample.steps)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: sample.seed)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: all at once)")
    parser.add_argument("--reverse-c2-zero", action="store_true",
                        help="ablation: reverse exponents k_hat = c1 everywhere (lomdm only)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--t-min", type=float, default=None, help="last time of the grid (default: sample.t_min)")
    parser.add_argument("--seq-len", type=int, default=None, help="sample length (default: data.seq_len)")
    return parser


def _check_cheap_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject what needs no checkpoint before paying for loading one."""
    for flag, value in (("--num", args.num), ("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--seq-len", args.seq_len)):
        if value is not None and value <= 0:
            parser.error(f"{flag} must be positive, got {value}")
    if args.t_min is not None and not 0.0 <= args.t_min < 1.0:
        parser.error(f"--t-min must be in [0, 1), got {args.t_min}")
    if not Path(args.ckpt).exists():
        parser.error(f"--ckpt: no such checkpoint or run directory: {args.ckpt}")
    out = Path(args.out)
    if out.is_dir():
        parser.error(f"--out: {out} is a directory, expected a file path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        parser.error(f"--out: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        parser.error(f"--out: {out} is not writable")


def _resolve_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    return choice


def _checkpoint_facts(ckpt: str) -> tuple[Path, int, bool]:
    """(resolved checkpoint directory, its training step, whether it holds EMA weights): what the
    provenance names, read here because the model loader falls back to the raw weights silently."""
    import json

    from lomdm_dist.parallel.checkpoint import STATE_DIR, saved_parts
    from lomdm_dist.train.checkpoint import MARKER, CheckpointError, resolve_checkpoint

    path = resolve_checkpoint(ckpt).resolve()
    try:
        step = int(json.loads((path / MARKER).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER} marker ({err})") from None
    return path, step, "ema" in saved_parts(path / STATE_DIR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_cheap_arguments(parser, args)

    from data_pipeline.errors import DataError
    from data_pipeline.tokenizers import get_tokenizer
    from lomdm_dist.diffusion.sampler import sample
    from lomdm_dist.train.checkpoint import CheckpointError, load_inference_model
    from lomdm_dist.train.samples import sample_records, write_jsonl_atomic

    try:
        device = _resolve_device(args.device)
        checkpoint, step, has_ema = _checkpoint_facts(args.ckpt)
        cfg, model, scheduler = load_inference_model(str(checkpoint), use_ema=not args.no_ema, device=device)
    except (CheckpointError, ValueError) as err:
        parser.error(str(err))
    if not args.no_ema and not has_ema:
        print(f"{checkpoint} holds no EMA weights: sampling with the raw weights", file=sys.stderr)
    try:
        tokenizer = get_tokenizer(cfg.data.tokenizer)
    except DataError as err:
        parser.error(f"--ckpt: the checkpoint's tokenizer cannot be loaded: {err}")
    if tokenizer.vocab_size > model.mask_token_id:
        parser.error(f"--ckpt: the tokenizer '{cfg.data.tokenizer}' has {tokenizer.vocab_size} ids but the "
                     f"model's mask token is id {model.mask_token_id}: checkpoint and tokenizer do not match")

    steps = args.steps if args.steps is not None else cfg.sample.steps
    num = args.num if args.num is not None else cfg.sample.num
    provenance = {
        "checkpoint": str(checkpoint), "step": step, "weights": "ema" if has_ema and not args.no_ema else "raw",
        "seed": args.seed if args.seed is not None else cfg.sample.seed, "steps": steps,
        "t_min": args.t_min if args.t_min is not None else cfg.sample.t_min, "num": num,
        "seq_len": args.seq_len if args.seq_len is not None else cfg.data.seq_len,
        "batch_size": min(args.batch_size or num, num), "final_argmax": cfg.sample.final_argmax,
        "reverse_c2_zero": args.reverse_c2_zero, "scheduler": cfg.diffusion.scheduler,
        "tokenizer": cfg.data.tokenizer, "device": device,
    }
    start = time.perf_counter()
    try:
        result = sample(model, scheduler, num=num, seq_len=provenance["seq_len"], steps=steps,
                        diffusion_cfg=cfg.diffusion, t_min=provenance["t_min"], final_argmax=cfg.sample.final_argmax,
                        reverse_c2_zero=args.reverse_c2_zero, seed=provenance["seed"],
                        batch_size=args.batch_size, device=device, progress=True)
    except ValueError as err:  # e.g. --reverse-c2-zero on a fixed scheduler, a block size not dividing --seq-len
        parser.error(str(err))
    seconds = time.perf_counter() - start

    provenance["argmax_filled"] = result.argmax_filled
    records = sample_records(result, tokenizer.decode, vocab_size=tokenizer.vocab_size, provenance=provenance)
    try:
        write_jsonl_atomic(args.out, records)
    except OSError as err:
        parser.error(f"--out: cannot write {args.out}: {err}")
    mean_entropy = sum(r["entropy"] for r in records) / len(records)
    print(f"wrote {len(records)} samples to {args.out}: {steps} steps, {result.model_calls} model calls, "
          f"mean unigram entropy {mean_entropy:.3f} nats, {result.argmax_filled} positions filled by the final "
          f"argmax, {seconds:.1f} s on {device}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
