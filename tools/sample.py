"""Sample text from a trained checkpoint and write it as JSON lines.

    python tools/sample.py --ckpt runs/smoke --num 8 --steps 128 --out samples.jsonl

``--ckpt`` is a checkpoint directory or a run directory (its latest complete checkpoint). Each output
line holds ``text``, ``tokens``, ``order`` (the step at which each position was unmasked; ``steps``
for the final argmax), ``entropy`` (unigram token entropy of the sample, nats) and ``provenance``,
the same object on every line, so that a sample can be traced and reproduced on its own:
``checkpoint`` (the resolved checkpoint directory), ``step`` (its training step), ``weights``
(``ema``, or ``raw`` with ``--no-ema`` or when the checkpoint holds no EMA), ``seed``, ``steps``,
``t_min``, ``num``, ``seq_len``, ``batch_size`` (rows per batch: the draws depend on it),
``final_argmax``, ``reverse_c2_zero``, ``scheduler``, ``tokenizer``, ``device`` (CPU and CUDA
generators draw differently), ``top_p``, ``prefix`` and ``infill`` (the given text or template, else
null). A summary with the number of network calls goes to stderr. The
sampling itself lives in ``lomdm_dist.diffusion.sampler``; this file only parses arguments, loads
and writes. Bad arguments, an unusable checkpoint or an unwritable output exit with status 2 and a
one-line reason.

Conditioning and sampling options:

* ``--prefix TEXT`` / ``--prefix-file FILE``: the tokenizer's BOS is given at position 0 (every
  training row starts with one), the text's tokens are given (clamped) at the positions after it
  and the rest of the sequence is generated (one trailing newline of a file is dropped).
* ``--infill TEMPLATE`` / ``--infill-file FILE``: a template of text and mask spans, laid out from
  position 1 after the BOS at position 0: ``[MASK]`` is one generated position, ``[MASK:N]`` is N
  of them, the text between them is given, and the positions after the template's end are generated
  too. The pieces of text are tokenised one by one, so write a word's leading space on the text
  side, as GPT-2 BPE attaches it to the word: ``"The cat[MASK:3] on the mat."``.
* ``--top-p P``: nucleus sampling, each token drawn from the smallest set of most probable tokens
  whose mass reaches P.
* ``--order-png FILE``: a heat map per sample (the first ``--order-png-num``) of the step at which
  each position was unmasked, given positions in a colour of their own. In ``order`` a given
  position has the value -1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path



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
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--prefix", default=None,
                       help="text given at positions 1.. after the tokenizer's BOS at position 0, as in training "
                            "rows (the rest is generated)")
    given.add_argument("--prefix-file", default=None, help="file whose text is the prefix")
    given.add_argument("--infill", default=None,
                       help="template laid out after the tokenizer's BOS at position 0: text given, [MASK] / "
                            "[MASK:N] spans and the positions after it generated")
    given.add_argument("--infill-file", default=None, help="file holding the infilling template")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1, off)")
    parser.add_argument("--order-png", default=None, help="write a heat map of each sample's unmasking order here")
    parser.add_argument("--order-png-num", type=int, default=8, help="samples drawn in --order-png (default: 8)")
    return parser


MASK_SPAN = re.compile(r"\[MASK(?::(\d+))?\]")
"""An infilling span: ``[MASK]`` (one position) or ``[MASK:N]`` (N positions)."""


def given_ids(encode, mask_id: int, seq_len: int, *, bos: int | None, prefix: str | None = None,
              infill: str | None = None) -> list[int] | None:
    """The sampler's ``given`` row for a prefix or an infilling template: token ids where text is
    given, ``mask_id`` where a position is generated (the template's spans and everything after its
    end); None when neither is set. Raises ValueError when the text does not fit or leaves nothing
    to generate.

    Every training row is ``[BOS] chunk [EOS]`` (``data_pipeline.packing``), so the model has only
    seen text start at position 1 after a BOS: ``bos`` (the tokenizer's, None if it has none) is
    given at position 0 and the prefix or template follows it. It counts towards ``seq_len``.
    """
    if prefix is None and infill is None:
        return None
    flag = "--prefix" if prefix is not None else "--infill"
    # Pieces are lists of given ids or counts of generated positions; the length is checked before
    # any span is expanded, so a huge [MASK:N] is a usage error, not a MemoryError.
    pieces: list[list[int] | int] = [[bos]] if bos is not None else []
    if prefix is not None:
        if not prefix:
            raise ValueError("--prefix: the prefix is empty")
        pieces.append(list(encode(prefix)))
    else:
        position = 0
        for span in MASK_SPAN.finditer(infill):
            if span.start() > position:
                pieces.append(list(encode(infill[position:span.start()])))
            length = int(span.group(1)) if span.group(1) is not None else 1
            if length <= 0:
                raise ValueError(f"--infill: a span {span.group(0)} must cover at least one position")
            pieces.append(length)
            position = span.end()
        if position < len(infill):
            pieces.append(list(encode(infill[position:])))
    used = sum(piece if isinstance(piece, int) else len(piece) for piece in pieces)
    if used > seq_len:
        with_bos = " with the BOS at position 0" if bos is not None else ""
        raise ValueError(f"{flag}: the text takes {used} positions{with_bos} but samples have only {seq_len} "
                         "(raise --seq-len or shorten it)")
    row = [token for piece in pieces for token in ([mask_id] * piece if isinstance(piece, int) else piece)]
    row += [mask_id] * (seq_len - len(row))
    if mask_id not in row:
        raise ValueError(f"{flag}: the given text fills all {seq_len} positions: nothing left to generate")
    return row


def _read_text_file(parser: argparse.ArgumentParser, flag: str, path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        parser.error(f"{flag}: cannot read {path} ({err})")
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _check_cheap_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject what needs no checkpoint before paying for loading one."""
    for flag, value in (("--num", args.num), ("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--seq-len", args.seq_len)):
        if value is not None and value <= 0:
            parser.error(f"{flag} must be positive, got {value}")
    if args.t_min is not None and not 0.0 <= args.t_min < 1.0:
        parser.error(f"--t-min must be in [0, 1), got {args.t_min}")
    if not 0.0 < args.top_p <= 1.0:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.order_png_num <= 0:
        parser.error(f"--order-png-num must be positive, got {args.order_png_num}")
    for flag, value in (("--prefix-file", args.prefix_file), ("--infill-file", args.infill_file)):
        if value is not None and not Path(value).is_file():
            parser.error(f"{flag}: no such file: {value}")
    if not Path(args.ckpt).exists():
        parser.error(f"--ckpt: no such checkpoint or run directory: {args.ckpt}")
    for flag, value in (("--out", args.out), ("--order-png", args.order_png)):
        if value is None:
            continue
        out = Path(value)
        if out.is_dir():
            parser.error(f"{flag}: {out} is a directory, expected a file path")
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir():
            parser.error(f"{flag}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
            parser.error(f"{flag}: {out} is not writable")


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

    from lomdm_dist.checkpoint.protocol import MARKER, STATE_DIR, CheckpointError, resolve_checkpoint
    from lomdm_dist.checkpoint.shards import saved_parts

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
    from lomdm_dist.checkpoint.inference import load_inference_model
    from lomdm_dist.checkpoint.protocol import CheckpointError
    from lomdm_dist.diffusion.sampler import sample
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
        "tokenizer": cfg.data.tokenizer, "device": device, "top_p": args.top_p,
        "prefix": args.prefix if args.prefix_file is None else _read_text_file(parser, "--prefix-file", args.prefix_file),
        "infill": args.infill if args.infill_file is None else _read_text_file(parser, "--infill-file", args.infill_file),
    }
    try:
        given = given_ids(tokenizer.encode, model.mask_token_id, provenance["seq_len"], bos=tokenizer.bos,
                          prefix=provenance["prefix"], infill=provenance["infill"])
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    try:
        result = sample(model, scheduler, num=num, seq_len=provenance["seq_len"], steps=steps,
                        diffusion_cfg=cfg.diffusion, t_min=provenance["t_min"], final_argmax=cfg.sample.final_argmax,
                        reverse_c2_zero=args.reverse_c2_zero, seed=provenance["seed"],
                        batch_size=args.batch_size, device=device, progress=True, given=given, top_p=args.top_p)
    except ValueError as err:  # e.g. --reverse-c2-zero on a fixed scheduler, a block size not dividing --seq-len
        parser.error(str(err))
    seconds = time.perf_counter() - start

    provenance["argmax_filled"] = result.argmax_filled
    records = sample_records(result, tokenizer.decode, vocab_size=tokenizer.vocab_size, provenance=provenance)
    try:
        write_jsonl_atomic(args.out, records)
    except OSError as err:
        parser.error(f"--out: cannot write {args.out}: {err}")
    if args.order_png is not None:
        from lomdm_dist.train.order_png import write_order_png

        try:
            write_order_png(args.order_png, result.order, steps, result.given, max_samples=args.order_png_num)
        except (OSError, RuntimeError) as err:
            parser.error(f"--order-png: cannot write {args.order_png}: {err}")
    mean_entropy = sum(r["entropy"] for r in records) / len(records)
    print(f"wrote {len(records)} samples to {args.out}: {steps} steps, {result.model_calls} model calls, "
          f"mean unigram entropy {mean_entropy:.3f} nats, {result.argmax_filled} positions filled by the final "
          f"argmax, {seconds:.1f} s on {device}"
          + (f", {given.count(model.mask_token_id)} of {len(given)} positions generated per sample (the rest given)"
             if given is not None else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
