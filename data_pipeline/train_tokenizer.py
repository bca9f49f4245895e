"""Train a sentencepiece vocabulary: ``python -m data_pipeline.train_tokenizer --input ... --vocab-size N --out DIR``.

The documents come from the same sources as a shard build (plain text by default; ``--source``
and ``--text-field`` as in ``data_pipeline.build``), fed to sentencepiece line by line from memory,
so any input the builder reads can train a vocabulary.  The model reserves ``<unk>`` = 0,
``<s>`` = 1 (BOS), ``</s>`` = 2 (EOS) and ``<pad>`` = 3, which the rest of the pipeline relies on,
and uses byte fallback so no text is ever unknown.  The result is ``DIR/spm.model`` (and
``spm.vocab``); ``get_tokenizer("DIR/spm.model")`` or ``--tokenizer DIR`` use it everywhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

from data_pipeline.errors import DataError
from data_pipeline.sources import SOURCE_KINDS, SourceSpec, clean_document, iter_raw_documents

MODEL_TYPES = ("bpe", "unigram")


def _sentences(source: SourceSpec, max_sentences: int) -> Iterator[str]:
    count = 0
    for raw in iter_raw_documents(source):
        text = clean_document(source, raw)
        if text is None:
            continue
        for line in text.splitlines():
            if line.strip():
                yield line
                count += 1
                if max_sentences and count >= max_sentences:
                    return


def train_sentencepiece(source: SourceSpec, vocab_size: int, out: str, *, model_type: str = "bpe",
                        character_coverage: float = 0.9995, max_sentences: int = 2_000_000,
                        byte_fallback: bool = True) -> Path:
    """Train and write ``out/spm.model``; returns its path."""
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise DataError(f"model_type: unknown value {model_type!r} (expected one of {MODEL_TYPES})")
    if vocab_size < 8:
        raise DataError(f"vocab_size must be at least 8, got {vocab_size}")
    out_dir = Path(out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(source, max_sentences), model_prefix=str(out_dir / "spm"),
            vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
            byte_fallback=byte_fallback, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            input_sentence_size=max_sentences, shuffle_input_sentence=False, minloglevel=2)
    except RuntimeError as err:
        raise DataError(f"sentencepiece training failed: {err}") from None
    return out_dir / "spm.model"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.train_tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    p.add_argument("--source", choices=SOURCE_KINDS, default="text")
    p.add_argument("--text-field", default="text")
    p.add_argument("--doc-split", choices=["file", "line", "blankline"], default="file")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-sentences", type=int, default=2_000_000)
    p.add_argument("--no-byte-fallback", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        source = SourceSpec(args.source, tuple(args.input), text_field=args.text_field, doc_split=args.doc_split)
        path = train_sentencepiece(source, args.vocab_size, args.out, model_type=args.model_type,
                                   character_coverage=args.character_coverage, max_sentences=args.max_sentences,
                                   byte_fallback=not args.no_byte_fallback)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
