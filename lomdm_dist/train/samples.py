"""Writing sampled sequences as JSON lines (text, tokens, unmasking order, entropy, provenance).

A samples file is one JSON object per line, one line per sample.  When the writer knows how the
samples were made (checkpoint and step, seed, reverse steps, t_min, weights, sampler switches), every
line carries it under ``provenance``: a line copied out of its file, or files concatenated, still
say where they came from, and readers that only want ``text`` / ``tokens`` need no header to skip.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Callable


def unigram_entropy(tokens: list[int]) -> float:
    """Entropy (nats) of the token histogram of one sample: low values reveal repetitive collapse."""
    counts = Counter(tokens)
    n = len(tokens)
    return -sum(c / n * math.log(c / n) for c in counts.values()) if n else 0.0


def sample_records(result, decode: Callable[[list[int]], str], *, vocab_size: int,
                   provenance: dict | None = None) -> list[dict]:
    """One record per sampled row; ``provenance`` (JSON-serialisable) is attached to each."""
    records = []
    for tokens, order in zip(result.tokens.tolist(), result.order.tolist()):
        text_ids = [t for t in tokens if t < vocab_size]
        record = {"text": decode(text_ids), "tokens": tokens, "order": order, "entropy": unigram_entropy(tokens)}
        if provenance is not None:
            record["provenance"] = dict(provenance)
        records.append(record)
    return records


def write_jsonl_atomic(path: str | os.PathLike, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def write_samples(path, result, decode, *, vocab_size: int, provenance: dict | None = None) -> list[str]:
    """Write the samples file (see the module docstring); returns the texts."""
    records = sample_records(result, decode, vocab_size=vocab_size, provenance=provenance)
    write_jsonl_atomic(path, records)
    return [r["text"] for r in records]
