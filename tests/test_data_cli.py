"""The data side of the command line: ``data.verify_checksums`` reaches the shard reader for both
splits, and ``python -m data_pipeline.build --help`` documents every flag."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.errors import DataError
from data_pipeline.manifest import sha256_file
from data_pipeline.shards import write_shard
from data_pipeline.tokenizers import get_tokenizer
from lomdm_dist.config import load_config
from lomdm_dist.train.data import build_data

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 8


def _rows(first: int, count: int) -> np.ndarray:
    return ((np.arange(first, first + count)[:, None] * 7 + np.arange(SEQ_LEN)[None, :]) % 50000).astype(np.uint16)


def _split(root: Path, name: str, counts: tuple[int, ...], fingerprint: str) -> Path:
    """A split as the builder writes it (sizes and sha256 in the manifest), by hand."""
    folder = root / name
    folder.mkdir(parents=True)
    shards, first = [], 0
    for i, count in enumerate(counts):
        path = folder / f"shard-{i:06d}.tar"
        size = write_shard(path, _rows(first, count), first)
        shards.append({"url": path.name, "samples": count, "bytes": size, "sha256": sha256_file(path)})
        first += count
    manifest = {"format": "lomdm-token-shards", "build_version": 1, "split": name, "seq_len": SEQ_LEN,
                "packing": "wrap", "pad_id": None, "dtype": "uint16", "num_samples": first,
                "num_tokens": first * SEQ_LEN, "shards": shards,
                "tokenizer": {"name": "gpt2", "fingerprint": fingerprint, "vocab_size": 50257,
                              "bos": 50256, "eos": 50256, "pad": None}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _silently_corrupt(shard: Path, row: np.ndarray) -> None:
    """Change one sample's tokens to other valid ids: same size, valid tar and .npy headers."""
    data = shard.read_bytes()
    at = data.index(row.tobytes())
    shard.write_bytes(data[:at] + (row + 1).tobytes() + data[at + row.nbytes:])


@pytest.fixture
def shards(tmp_path) -> Path:
    fingerprint = get_tokenizer("gpt2").fingerprint
    _split(tmp_path, "train", (6, 6, 6), fingerprint)
    _split(tmp_path, "val", (4, 4), fingerprint)
    return tmp_path


def _data(root: Path, *overrides: str):
    cfg = load_config(None, ["data.source=shards", f"data.path={root / 'train' / 'manifest.json'}",
                             f"data.seq_len={SEQ_LEN}", "data.batch_size=4", *overrides])
    return build_data(cfg)


def test_verify_checksums_finds_a_corrupt_training_shard(shards, caplog):
    _silently_corrupt(shards / "train" / "shard-000001.tar", _rows(6, 1)[0])
    assert _data(shards).stream.num_samples == 18                  # size and headers look right
    with pytest.raises(DataError, match=r"shard .*train/shard-000001\.tar: sha256 differs from the manifest"):
        _data(shards, "data.verify_checksums=true")
    with caplog.at_level(logging.WARNING, logger="data_pipeline.reader"):
        data = _data(shards, "data.verify_checksums=true", "data.skip_corrupt_shards=true")
    assert data.stats["corrupt_shards_skipped"] == 1 and data.stream.num_samples == 12
    assert "shard-000001.tar" in caplog.text


def test_verify_checksums_covers_the_validation_split(shards):
    _silently_corrupt(shards / "val" / "shard-000000.tar", _rows(2, 1)[0])
    assert len(list(_data(shards).eval_batches())) == 1
    with pytest.raises(DataError, match=r"shard .*val/shard-000000\.tar: sha256 differs from the manifest"):
        _data(shards, "data.verify_checksums=true")


def test_build_help_documents_every_flag():
    from data_pipeline.build import _parser

    parser = _parser()
    undocumented = [action.option_strings[0] for action in parser._actions if not action.help]
    assert undocumented == []
    text = subprocess.run([sys.executable, "-m", "data_pipeline.build", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60).stdout
    assert "``" not in text and "output directory" in text
    assert "examples:" in text and "--recipe owt" in text
