"""Build tokenised, packed webdataset shards: ``python -m data_pipeline.build ...``.

``--input`` takes files, directories or globs (dataset names for ``--source hf``); ``--recipe``
fills in the MDLM settings (``owt``, ``lm1b-wrap``, ``lm1b-pad``, ``wikipedia``) and explicit flags
override them.  Output: ``OUT/train/`` and, with a validation split, ``OUT/val/``, each holding
``shard-NNNNNN.tar`` files and ``manifest.json``.  The work itself is in ``data_pipeline.builder``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from data_pipeline.builder import DEFAULT_PART_BYTES, DEFAULT_ROWS_PER_SHARD, BuildConfig, build
from data_pipeline.errors import DataError
from data_pipeline.manifest import read_manifest
from data_pipeline.packing import PACKINGS
from data_pipeline.sources import DETOKENIZERS, SourceSpec, gensim_wikipedia_excerpt

RECIPES: dict[str, dict] = {
    # MDLM's OpenWebText: GPT-2, length 1024, wrapped, the last 100,000 documents as validation.
    "owt": {"source": "hf", "input": ["Skylion007/openwebtext"], "tokenizer": "gpt2", "seq_len": 1024,
            "packing": "wrap", "val_docs": 100_000},
    # MDLM's LM1B: bert-base-uncased, length 128, detokenised; the test split validates.
    "lm1b-wrap": {"source": "hf", "input": ["lm1b"], "hf_val_split": "test", "tokenizer": "bert-base-uncased",
                  "seq_len": 128, "packing": "wrap", "detokenize": "lm1b", "doc_split": "line"},
    "lm1b-pad": {"source": "hf", "input": ["lm1b"], "hf_val_split": "test", "tokenizer": "bert-base-uncased",
                 "seq_len": 128, "packing": "pad", "detokenize": "lm1b", "doc_split": "line"},
    # The Wikipedia excerpt bundled with gensim (the smoke-test corpus).
    "wikipedia": {"source": "wikipedia", "tokenizer": "gpt2", "seq_len": 128, "packing": "wrap", "val_docs": 8},
}


DESCRIPTION = """\
Build tokenised, packed webdataset shards for training: OUT/train/ and, with a validation split,
OUT/val/, each holding shard-NNNNNN.tar files and manifest.json (train with data.source=shards
data.path=OUT/train/manifest.json). --recipe fills in an MDLM recipe's settings; explicit flags
override them. The build runs on --workers processes, resumes after an interruption, and gives
byte-identical shards when run again with the same settings."""

EPILOG = """\
examples:
  python -m data_pipeline.build --recipe owt --out data/owt --workers 16
  python -m data_pipeline.build --source jsonl --input 'owt/*.jsonl' --tokenizer gpt2 --seq-len 1024 \\
      --val-docs 100000 --out data/owt
  python -m data_pipeline.build --recipe lm1b-pad --out data/lm1b"""


_DETOKENIZER_NAMES = ("none", *(name for name in DETOKENIZERS if name))


def _detokenize_choice(value: str) -> str:
    """``--detokenize`` value: ``none`` (or empty) means no detokeniser."""
    if value in ("", "none"):
        return ""
    if value not in _DETOKENIZER_NAMES:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(_DETOKENIZER_NAMES)})")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.build", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="MDLM recipe defaults (owt: OpenWebText, GPT-2, length 1024; lm1b-wrap / lm1b-pad: LM1B, "
                        "bert-base-uncased, length 128, packed or padded; wikipedia: the bundled excerpt); "
                        "explicit flags win")
    p.add_argument("--source", choices=["text", "jsonl", "parquet", "hf", "wikipedia"],
                   help="kind of input: plain text files, jsonl, parquet, a Hugging Face dataset (hf) or a "
                        "MediaWiki .xml(.bz2) dump (wikipedia; without --input, the excerpt gensim ships)")
    p.add_argument("--input", nargs="+", help="files, directories or globs (hf: dataset names)")
    p.add_argument("--val-input", nargs="+", help="a separate validation input (same source kind)")
    p.add_argument("--text-field", default=None, help="jsonl field / parquet or hf column (default: text)")
    p.add_argument("--doc-split", choices=["file", "line", "blankline"], default=None,
                   help="plain text: one document per file, line or paragraph (default: file)")
    p.add_argument("--hf-split", default=None, help="hf: training split (default: train)")
    p.add_argument("--hf-val-split", default=None, help="hf: validation split, e.g. test")
    p.add_argument("--detokenize", type=_detokenize_choice, default=None,
                   metavar="{" + ",".join(_DETOKENIZER_NAMES) + "}",
                   help="undo the input's own word tokenisation first: lm1b removes the spaces LM1B puts around "
                        "punctuation, quotes and brackets, as MDLM does (default: none)")
    p.add_argument("--tokenizer", default=None, help="gpt2, bert-base-uncased, or a sentencepiece .model")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per row, BOS and EOS included; the trainer's data.seq_len must match")
    p.add_argument("--packing", choices=list(PACKINGS), default=None,
                   help="wrap: documents joined with EOS and cut into full rows; pad: one document per row, "
                        "truncated or padded to --seq-len (default: wrap)")
    p.add_argument("--out", required=True, help="output directory (train/ and val/ are created in it)")
    p.add_argument("--val-docs", type=int, default=None,
                   help="hold out the last N documents of the input as the validation split (default: the "
                        "recipe's, else 0: no validation split unless --val-input or --hf-val-split names one)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes that clean, tokenise and write (default: the CPU count); the shards do "
                        "not depend on it")
    p.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD,
                   help=f"rows in each shard file (default: {DEFAULT_ROWS_PER_SHARD}; changes the build settings)")
    p.add_argument("--part-mb", type=float, default=DEFAULT_PART_BYTES / (1 << 20),
                   help="MB of raw text per tokenisation task (default: %(default)g; changes the build settings)")
    p.add_argument("--overwrite", action="store_true", help="discard a build with other settings in --out")
    p.add_argument("--keep-work", action="store_true", help="keep the tokenised parts afterwards")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and batch jobs)")
    return p


def config_from_args(argv: Optional[Sequence[str]] = None) -> BuildConfig:
    args = _parser().parse_args(argv)
    recipe = RECIPES.get(args.recipe or "", {})

    def pick(name: str, default):
        value = getattr(args, name)
        return value if value is not None else recipe.get(name, default)

    kind = pick("source", None)
    inputs = pick("input", None)
    if kind is None:
        raise DataError("--source is required (or a --recipe)")
    if inputs is None:
        if kind != "wikipedia":
            raise DataError("--input is required for this source")
        inputs = [gensim_wikipedia_excerpt()]
    common = dict(text_field=pick("text_field", "text"), doc_split=pick("doc_split", "file"),
                  detokenize=pick("detokenize", ""))
    source = SourceSpec(kind, tuple(inputs), hf_split=pick("hf_split", "train"), **common)
    val_source = None
    if args.val_input:
        val_source = SourceSpec(kind, tuple(args.val_input), hf_split=pick("hf_val_split", "validation"), **common)
    elif kind == "hf" and pick("hf_val_split", None):
        val_source = SourceSpec(kind, tuple(inputs), hf_split=pick("hf_val_split", None), **common)
    tokenizer, seq_len = pick("tokenizer", None), pick("seq_len", None)
    if tokenizer is None or seq_len is None:
        raise DataError("--tokenizer and --seq-len are required (or a --recipe)")
    return BuildConfig(source=source, tokenizer=tokenizer, seq_len=seq_len, out=args.out,
                       packing=pick("packing", "wrap"),
                       val_docs=0 if val_source is not None else pick("val_docs", 0), val_source=val_source,
                       rows_per_shard=args.rows_per_shard, part_bytes=int(args.part_mb * (1 << 20)),
                       workers=args.workers, progress=not args.no_progress, keep_work=args.keep_work)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg = config_from_args(argv)
        args = _parser().parse_args(argv)
        manifests = build(cfg, overwrite=args.overwrite)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, path in manifests.items():
        manifest = read_manifest(path)
        print(f"{split}: {manifest['num_samples']} rows x {manifest['seq_len']} tokens in "
              f"{len(manifest['shards'])} shards -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
