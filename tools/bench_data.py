"""Data pipeline throughput: builder MB/s of raw text per core, reader tokens/s per process.

    python tools/bench_data.py [--text-mb 32] [--seq-len 1024] [--batch-size 32] [--workers 2]

The text is real: the cleaned articles of the Wikipedia excerpt gensim ships, repeated to
``--text-mb`` and written as jsonl (so the builder measures reading + tokenising + packing +
writing, not Wikipedia markup removal, which is measured separately on the dump itself).
Targets from the design: builder >= 2 MB/s per core, reader >= 5 M tokens/s per process.
Prints a markdown table to paste into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from data_pipeline.builder import BuildConfig, build
from data_pipeline.reader import ShardStream, iter_eval_batches
from data_pipeline.sources import (SourceSpec, clean_document, gensim_wikipedia_excerpt,
                                   iter_raw_documents)


def write_corpus(path: Path, megabytes: float) -> int:
    """Cleaned Wikipedia articles as jsonl, repeated to the requested size; returns text bytes."""
    source = SourceSpec("wikipedia", (gensim_wikipedia_excerpt(),))
    articles = [t for t in (clean_document(source, raw) for raw in iter_raw_documents(source)) if t]
    target, written = int(megabytes * (1 << 20)), 0
    with open(path, "w") as handle:
        while written < target:
            for text in articles:
                handle.write(json.dumps({"text": text}) + "\n")
                written += len(text.encode())
                if written >= target:
                    break
    return written


def bench_build(corpus: Path, text_bytes: int, out: Path, seq_len: int, workers: int) -> dict:
    cfg = BuildConfig(source=SourceSpec("jsonl", (str(corpus),)), tokenizer="gpt2", seq_len=seq_len,
                      out=str(out), workers=workers, progress=False, part_bytes=4 << 20)
    start = time.perf_counter()
    manifests = build(cfg)
    seconds = time.perf_counter() - start
    mb = text_bytes / (1 << 20)
    return {"name": f"builder, jsonl -> gpt2 shards, {workers} worker(s)", "seconds": seconds,
            "value": mb / seconds / workers, "unit": "MB/s of text per core", "manifest": manifests["train"]}


def bench_wikipedia_build(out: Path) -> dict:
    dump = gensim_wikipedia_excerpt()
    source = SourceSpec("wikipedia", (dump,))
    text_bytes = sum(len(t.encode()) for t in (clean_document(source, raw) for raw in iter_raw_documents(source)) if t)
    cfg = BuildConfig(source=source, tokenizer="gpt2", seq_len=1024, out=str(out), workers=1, progress=False,
                      part_bytes=1 << 20)
    start = time.perf_counter()
    build(cfg)
    seconds = time.perf_counter() - start
    return {"name": "builder, Wikipedia XML dump (markup removal included), 1 worker", "seconds": seconds,
            "value": text_bytes / (1 << 20) / seconds, "unit": "MB/s of article text per core"}


def bench_reader(manifest: str, batch_size: int, workers: int, seconds: float = 4.0) -> dict:
    stream = ShardStream(manifest, seed=0, rank=0, world_size=1, batch_size=batch_size, num_workers=workers)
    iterator = iter(stream)
    next(iterator)  # start-up (worker spawn, first permutation) is not throughput
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += next(iterator).numel()
    elapsed = time.perf_counter() - start
    iterator.close()
    return {"name": f"reader ShardStream, batch {batch_size}, {workers} loader worker(s)", "seconds": elapsed,
            "value": tokens / elapsed / 1e6, "unit": "M tokens/s per process"}


def bench_eval(manifest: str, batch_size: int) -> dict:
    start, tokens = time.perf_counter(), 0
    for batch in iter_eval_batches(manifest, batch_size):
        tokens += batch.numel()
    elapsed = time.perf_counter() - start
    return {"name": f"reader iter_eval_batches, batch {batch_size} (one pass)", "seconds": elapsed,
            "value": tokens / elapsed / 1e6, "unit": "M tokens/s per process"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text-mb", type=float, default=32.0)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--dir", default="", help="scratch directory (default: a temporary one)")
    p.add_argument("--reader-seconds", type=float, default=4.0,
                   help="how long each reader measurement runs (default 4)")
    args = p.parse_args()
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir or None) as scratch:
        root = Path(scratch)
        corpus = root / "corpus.jsonl"
        text_bytes = write_corpus(corpus, args.text_mb)
        results = [bench_build(corpus, text_bytes, root / "w1", args.seq_len, 1)]
        if args.workers > 1:
            results.append(bench_build(corpus, text_bytes, root / f"w{args.workers}", args.seq_len, args.workers))
        results.append(bench_wikipedia_build(root / "wiki"))
        manifest = results[0]["manifest"]
        results.append(bench_reader(manifest, args.batch_size, 0, seconds=args.reader_seconds))
        if args.workers > 0:
            results.append(bench_reader(manifest, args.batch_size, args.workers, seconds=args.reader_seconds))
        results.append(bench_eval(manifest, args.batch_size))
    print(f"Data pipeline, {date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{text_bytes / (1 << 20):.1f} MB of text, seq_len {args.seq_len}\n")
    print("| measurement | value | unit | seconds |\n| --- | ---: | --- | ---: |")
    for r in results:
        print(f"| {r['name']} | {r['value']:.2f} | {r['unit']} | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
