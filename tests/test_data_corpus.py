"""End to end on real text: the Wikipedia excerpt gensim ships, built once and streamed."""

import bz2
from pathlib import Path

import pytest
import torch

from data_pipeline.sources import gensim_wikipedia_excerpt
from data_pipeline.corpus import ensure_bundled_corpus
from data_pipeline.reader import ShardStream, iter_eval_batches, read_manifest
from data_pipeline.tokenizers import get_tokenizer

SEQ_LEN, VAL_DOCS = 64, 6


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, ensure_bundled_corpus(str(cache), "gpt2", SEQ_LEN, VAL_DOCS)


def test_bundled_corpus_is_real_packed_wikipedia(bundled):
    _, (train, val) = bundled
    tok = get_tokenizer("gpt2")
    train_m, val_m = read_manifest(train), read_manifest(val)
    assert val_m["num_documents"] == VAL_DOCS
    # gensim's wiki utilities keep about 105 of the excerpt's pages (redirects and stubs dropped).
    assert 95 <= train_m["num_documents"] + VAL_DOCS <= 115
    # The excerpt holds 206 article-namespace pages; the rest were rejected and counted as such,
    # two of them (redirect pages) as repeats of an earlier page's exact text.
    assert (train_m["num_documents"] + VAL_DOCS + train_m["input_documents_dropped"]
            + train_m["duplicate_documents_skipped"]) == 206
    assert train_m["duplicate_documents_skipped"] == val_m["duplicate_documents_skipped"] == 2
    assert train_m["duplicate_files_skipped"] == 0
    for manifest in (train_m, val_m):
        assert manifest["seq_len"] == SEQ_LEN and manifest["tokenizer"]["fingerprint"] == tok.fingerprint
        stream_tokens = manifest["document_tokens"] + manifest["num_documents"]  # each doc + its EOS
        assert manifest["num_samples"] == stream_tokens // (SEQ_LEN - 2)
    assert 550_000 < train_m["document_tokens"] + val_m["document_tokens"] < 850_000
    rows = torch.cat(list(iter_eval_batches(train, 256, max_batches=2)))
    assert (rows[:, 0] == tok.bos).all() and (rows[:, -1] == tok.eos).all()
    text = tok.decode(rows[:, 1:-1].reshape(-1).tolist())
    # The dump starts with "Anarchism"; its first row is the article's first words, markup removed.
    assert text.startswith("Anarchism is a political philosophy")
    assert "'''" not in text and "[[" not in text and "{{" not in text
    with bz2.open(gensim_wikipedia_excerpt(), "rt") as dump:
        assert "Anarchism" in dump.read(20_000)


def test_second_call_reuses_the_build(bundled):
    cache, (train, val) = bundled
    stamps = {p: p.stat().st_mtime_ns for p in Path(cache).rglob("*.tar")}
    assert ensure_bundled_corpus(str(cache), "gpt2", SEQ_LEN, VAL_DOCS) == (train, val)
    assert stamps == {p: p.stat().st_mtime_ns for p in Path(cache).rglob("*.tar")}


def test_trainer_style_stream_over_the_bundled_corpus(bundled):
    _, (train, _) = bundled
    tok = get_tokenizer("gpt2")
    stream = ShardStream(train, seed=0, rank=0, world_size=1, batch_size=8,
                         expect_seq_len=SEQ_LEN, expect_tokenizer_fingerprint=tok.fingerprint)
    batch = next(iter(stream))
    assert batch.shape == (8, SEQ_LEN) and batch.dtype == torch.int64
    assert int(batch.max()) < stream.vocab_size == 50257
