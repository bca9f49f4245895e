"""Generative perplexity and unigram entropy of sampled text under an autoregressive judge.

    python tools/gen_ppl.py --samples samples.jsonl [--judge gpt2-large] [--batch-size 8] \\
        [--device auto] [--out gen_ppl.json] [--offline]

``--samples`` is a JSON-lines file as ``tools/sample.py`` writes it (only each line's ``text`` is
needed; ``tokens``, when present, gives the entropy). ``--judge`` is a Hugging Face Hub name (looked up
in the local cache first, downloaded only if absent; ``--offline`` or ``HF_HUB_OFFLINE=1`` forbids
the download) or a local directory written by ``save_pretrained``. Prints the token-weighted gen-PPL
(MDLM's metric), the mean per-sample gen-PPL, the mean unigram entropy and the number of samples;
``--out`` also writes them with every sample's numbers as JSON. The protocol (retokenisation,
windows of the judge's context, truncation at the first end-of-text token) is described in
``lomdm_dist.eval.generative``. Bad arguments, an unreadable samples file or a judge that cannot be
found exit with status 2 and a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gen_ppl.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", required=True, help="samples .jsonl file (a 'text' field per line)")
    parser.add_argument("--judge", default="gpt2-large",
                        help="autoregressive judge: Hugging Face Hub name or local directory (default: gpt2-large)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per judge call (default: 8)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--out", default=None, help="write the numbers and per-sample results to this .json file")
    parser.add_argument("--offline", action="store_true", help="never download the judge")
    return parser


def _resolve_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {choice!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {choice}: CUDA is not available on this machine")
    return choice


def _check_out(parser: argparse.ArgumentParser, out: str | None) -> None:
    if out is None:
        return
    path = Path(out)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        parser.error(f"--out: {path} is a directory, expected a file path")
    if not parent.is_dir():
        parser.error(f"--out: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        parser.error(f"--out: {path} is not writable")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    _check_out(parser, args.out)

    from lomdm_dist.eval.generative import (JudgeNotFound, SamplesFileError, generative_perplexity, load_judge,
                                            read_samples)

    try:
        samples = read_samples(args.samples)
        device = _resolve_device(args.device)
        judge = load_judge(args.judge, device=device, offline=args.offline)
    except (SamplesFileError, JudgeNotFound, ValueError) as err:
        parser.error(str(err))
    report = generative_perplexity(judge, samples, batch_size=args.batch_size, progress=True)
    result = {"samples_file": str(Path(args.samples).resolve()), "device": device, **report.to_json()}
    if args.out is not None:
        tmp = Path(args.out).with_name(f".{Path(args.out).name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            os.replace(tmp, args.out)
        except OSError as err:
            parser.error(f"--out: cannot write {args.out}: {err}")
    if report.unscored_samples:
        print(f"{report.unscored_samples} samples have fewer than 2 judge tokens before their first end-of-text "
              "token and are left out of the perplexities", file=sys.stderr)
    print(f"gen-PPL {_fmt(report.gen_ppl)} (token-weighted), mean per-sample gen-PPL "
          f"{_fmt(report.mean_sample_gen_ppl)}, mean unigram entropy {report.mean_entropy:.3f} nats, "
          f"{report.num_samples} samples, {report.tokens_scored} tokens scored under {args.judge} "
          f"(windows of {report.context}; {report.samples_truncated_at_eos} samples cut at their first EOS, "
          f"{report.samples_eos_unscored} of them with that EOS starting a window, so context only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
