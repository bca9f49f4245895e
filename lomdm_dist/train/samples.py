"""Writing sampled sequences as JSON lines (text, tokens, unmasking order, entropy)."""

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


def sample_records(result, decode: Callable[[list[int]], str], *, vocab_size: int) -> list[dict]:
    records = []
    for tokens, order in zip(result.tokens.tolist(), result.order.tolist()):
        text_ids = [t for t in tokens if t < vocab_size]
        records.append({"text": decode(text_ids), "tokens": tokens, "order": order,
                        "entropy": unigram_entropy(tokens)})
    return records


def write_jsonl_atomic(path: str | os.PathLike, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def write_samples(path, result, decode, *, vocab_size: int) -> list[str]:
    records = sample_records(result, decode, vocab_size=vocab_size)
    write_jsonl_atomic(path, records)
    return [r["text"] for r in records]
