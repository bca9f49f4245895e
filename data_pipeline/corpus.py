"""The bundled real-text corpus: shards of the Wikipedia excerpt that gensim ships.

The smoke config and the README's first command train on real text without any download: the
enwiki XML excerpt in gensim's test data (about 105 articles, 3.1 MB of text) is cleaned, tokenised
and packed the MDLM way into a cache directory on first use, and reused afterwards.  The cache
directory name carries the settings, so changing the tokenizer, sequence length or validation size
builds a new set instead of mixing; a build interrupted by a crash resumes on the next call, and
concurrent callers (several ranks on one machine) wait for one build instead of racing.  The
excerpt is built in-process (a process pool costs more than it saves on 3 MB); a full dump passed
as ``wiki_path`` is built on all cores.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from data_pipeline.builder import BuildConfig, build
from data_pipeline.sources import SourceSpec, gensim_wikipedia_excerpt
from data_pipeline.tokenizers import get_tokenizer

BUNDLED_ROWS_PER_SHARD = 1024


def bundled_corpus_dir(cache_dir: str, tokenizer_name: str, seq_len: int, val_docs: int, wiki_path: str = "") -> Path:
    """Where ``ensure_bundled_corpus`` puts a given configuration."""
    dump = str(Path(wiki_path).expanduser().resolve()) if wiki_path else "gensim-excerpt"
    fingerprint = get_tokenizer(tokenizer_name).fingerprint
    key = hashlib.sha256(f"{dump}|{fingerprint}|{seq_len}|{val_docs}".encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(tokenizer_name).stem if os.sep in tokenizer_name else tokenizer_name)
    return Path(cache_dir).expanduser() / f"wikipedia-{slug}-L{seq_len}-val{val_docs}-{key}"


def ensure_bundled_corpus(cache_dir: str, tokenizer_name: str, seq_len: int, val_docs: int,
                          wiki_path: str = "") -> tuple[str, str]:
    """Build (once; reuse when a complete build with the same settings exists) webdataset shards of the
    Wikipedia excerpt shipped with gensim (or the dump at ``wiki_path``), the last ``val_docs``
    articles as validation, MDLM packing (documents joined with EOS, cut into chunks of
    ``seq_len - 2``, each row ``[BOS] + chunk + [EOS]``).

    Returns ``(train_manifest_path, val_manifest_path)``.  Shows progress; a call after a crashed
    build resumes it, and concurrent calls wait for each other (a file lock on the build directory).
    """
    if val_docs <= 0:
        raise ValueError(f"val_docs must be positive for the bundled corpus, got {val_docs}")
    dump = wiki_path or gensim_wikipedia_excerpt()
    cfg = BuildConfig(source=SourceSpec("wikipedia", (dump,)), tokenizer=tokenizer_name, seq_len=seq_len,
                      out=str(bundled_corpus_dir(cache_dir, tokenizer_name, seq_len, val_docs, wiki_path)),
                      packing="wrap", val_docs=val_docs, rows_per_shard=BUNDLED_ROWS_PER_SHARD,
                      part_bytes=1 << 20, workers=max(1, os.cpu_count() or 1) if wiki_path else 1,
                      progress=True)
    manifests = build(cfg, overwrite=True)  # the directory is ours: other settings mean stale code
    return manifests["train"], manifests["val"]
