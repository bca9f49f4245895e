"""Evaluate a checkpoint: NELBO per token (L_main + L_velocity), its standard error, perplexity.

    python tools/evaluate.py --ckpt runs/owt --data data/owt --t-samples 4 --out eval.json
    python tools/evaluate.py --ckpt runs/owt --data zero-shot --data-dir ~/zero-shot --out zs.json
    python tools/evaluate.py --ckpt runs/owt --data data/owt --nproc 4 parallel.tp=2

``--ckpt`` is a checkpoint directory or a run directory (its latest complete checkpoint).
``--data`` is a shard manifest, its folder or a build directory (``--split validation``, the
default, reads its ``val/``), or ``zero-shot`` for the eight corpora of the MDLM / BD3LM zero-shot
table (PTB, WikiText-2, WikiText-103, LM1B, LAMBADA, AG News, PubMed, arXiv), or some of their
names, comma-separated (``ptb,lambada``). The zero-shot corpora are read from ``--data-dir`` /
``$LOMDM_ZERO_SHOT_DIR`` (``<dir>/<name>/``: a ``save_to_disk`` folder or parquet/json files) or
the Hugging Face hub. Each row gets ``--t-samples`` diffusion times, stratified over the batch,
one mask each; the EMA weights are used unless ``--no-ema``. ``--nproc N`` runs N processes on
this machine (gloo on CPU) in the layout the trailing ``key=value`` overrides give (data parallel
by default); the numbers equal one process's. A table goes to stdout (and ``--out`` gets it as
JSON); bad arguments, a missing or damaged checkpoint or data set exit with status 2 and a
one-line reason. The work is done in ``lomdm_dist.eval.evaluate``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint directory or run directory")
    parser.add_argument("--data", required=True,
                        help="shard manifest / its folder / build directory, or 'zero-shot' or corpus names")
    parser.add_argument("--split", default=None, choices=("validation", "train", "test"),
                        help="split of a build directory (default validation) or of the zero-shot corpora "
                             "(default: each corpus' own, as MDLM)")
    parser.add_argument("--t-samples", type=int, default=1, help="diffusion times per row (default 1)")
    parser.add_argument("--ema", dest="ema", action="store_true", default=True, help="EMA weights (default)")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="the raw weights")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (default 1)")
    parser.add_argument("--batch-size", type=int, default=0, help="rows per batch (default data.eval_batch_size)")
    parser.add_argument("--max-rows", type=int, default=0, help="only the first rows of each data set (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the time and mask draws (default 0)")
    parser.add_argument("--data-dir", default=None, help="local copies of the zero-shot corpora")
    parser.add_argument("--seq-len", type=int, default=0, help="zero-shot row length (default data.seq_len)")
    parser.add_argument("--layout", choices=("wrap", "pad"), default="wrap",
                        help="zero-shot rows: documents concatenated and chunked (default, MDLM) or one per row")
    parser.add_argument("--no-doc-eos", dest="doc_eos", action="store_false",
                        help="zero-shot wrap without an EOS after each document (BD3LM's insert_valid_eos=False)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--out", default=None, help="also write the results as JSON to this file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the checkpoint's config")
    return parser


def _check_cheap_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.nproc < 1:
        parser.error(f"--nproc must be positive, got {args.nproc}")
    for text in args.overrides:
        if "=" not in text:
            parser.error(f"override {text!r} is not key.sub=value")
    if args.out:
        out = Path(args.out)
        parent = out.parent if str(out.parent) else Path(".")
        if out.is_dir() or not parent.is_dir():
            parser.error(f"--out: cannot write a file at {out}")


def _worker_env():
    """This process's place when it is one rank of ``--nproc`` (None when it should start them)."""
    from lomdm_dist.parallel import ProcessEnv

    return ProcessEnv.from_environ() if "WORLD_SIZE" in os.environ else None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_intermixed_args(argv)
    _check_cheap_arguments(parser, args)
    env = _worker_env()
    from data_pipeline.errors import DataError
    from lomdm_dist.checkpoint import CheckpointError
    from lomdm_dist.config import ConfigError
    from lomdm_dist.eval.evaluate import EvalRequest, check_request, checkpoint_config, format_table, run_evaluation

    request = EvalRequest(ckpt=args.ckpt, data=args.data, split=args.split, t_samples=args.t_samples,
                          use_ema=args.ema, batch_size=args.batch_size, max_rows=args.max_rows, seed=args.seed,
                          overrides=tuple(args.overrides), data_dir=args.data_dir, seq_len=args.seq_len,
                          layout=args.layout, doc_eos=args.doc_eos, progress=args.progress)
    if args.nproc > 1 and env is None:
        from lomdm_dist.launch.local import launch
        from lomdm_dist.parallel.layout import validate_layout

        try:     # reported once, before any process starts
            check_request(request)
            validate_layout(checkpoint_config(request, args.nproc)[1], args.nproc)
        except (CheckpointError, ConfigError) as err:
            parser.error(str(err))
        return launch([sys.executable, str(Path(__file__).resolve()), *argv], args.nproc)
    rank = env.rank if env is not None else 0
    try:
        report = run_evaluation(request, env)
    except (CheckpointError, DataError, ConfigError, ValueError) as err:
        if rank == 0:
            print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    if rank == 0:
        print(format_table(report))
        if args.out:
            Path(args.out).write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
