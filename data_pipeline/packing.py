"""Row layouts of the MDLM recipes, as pure numpy functions.

* ``wrap`` (OWT, LM1B-wrap, Wikipedia): every document gets an EOS, all documents are concatenated
  into one stream, the stream is cut into chunks of ``seq_len - 2`` tokens and each row is
  ``[BOS] + chunk + [EOS]``; the final partial chunk is dropped (MDLM drops the remainder of every
  map batch; we drop it once per split, so at most ``seq_len - 3`` tokens per split are lost).
  For GPT-2, BOS = EOS, so a document boundary inside a row reads ``... doc_a <eot> doc_b ...``.
* ``pad`` (LM1B unpacked): one row per document, ``[BOS] + doc[:seq_len - 2] + [EOS]`` followed by
  PAD up to ``seq_len`` (MDLM's ``padding='max_length', truncation=True`` with special tokens).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from data_pipeline.errors import DataError

PACKINGS = ("wrap", "pad")


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype for ids below ``vocab_size`` (uint16 up to 65,536 entries)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 3:
        raise DataError(f"seq_len must be an integer >= 3 (BOS, one token, EOS), got {seq_len!r}")


def join_with_eos(docs: Sequence[np.ndarray], eos: int, dtype: np.dtype) -> np.ndarray:
    """The wrap stream of some documents: each followed by one EOS."""
    total = sum(len(d) for d in docs) + len(docs)
    out = np.empty(total, dtype=dtype)
    pos = 0
    for doc in docs:
        out[pos:pos + len(doc)] = doc
        pos += len(doc)
        out[pos] = eos
        pos += 1
    return out


def wrapped_row_count(stream_tokens: int, seq_len: int) -> int:
    """Rows the wrap layout makes from a stream of ``stream_tokens`` tokens (EOS included)."""
    return stream_tokens // (seq_len - 2)


def wrap_rows(chunk_tokens: np.ndarray, seq_len: int, bos: int, eos: int) -> np.ndarray:
    """Rows ``[BOS] + chunk + [EOS]`` of a stream slice whose length is a multiple of ``seq_len - 2``."""
    check_seq_len(seq_len)
    body = seq_len - 2
    if len(chunk_tokens) % body:
        raise DataError(f"wrap: slice of {len(chunk_tokens)} tokens is not a multiple of seq_len - 2 = {body}")
    rows = np.empty((len(chunk_tokens) // body, seq_len), dtype=chunk_tokens.dtype)
    rows[:, 0] = bos
    rows[:, 1:-1] = chunk_tokens.reshape(-1, body)
    rows[:, -1] = eos
    return rows


def pad_rows(docs: Sequence[np.ndarray], seq_len: int, bos: int, eos: int, pad: int | None,
             dtype: np.dtype) -> np.ndarray:
    """One row per document: ``[BOS] + doc[:seq_len-2] + [EOS]``, then PAD to ``seq_len``."""
    check_seq_len(seq_len)
    if pad is None:
        raise DataError("packing 'pad' needs a tokenizer with a pad token (gpt2 has none; use 'wrap')")
    rows = np.full((len(docs), seq_len), pad, dtype=dtype)
    for i, doc in enumerate(docs):
        body = doc[:seq_len - 2]
        rows[i, 0] = bos
        rows[i, 1:1 + len(body)] = body
        rows[i, 1 + len(body)] = eos
    return rows
