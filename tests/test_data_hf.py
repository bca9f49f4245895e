"""The Hugging Face source: a dataset saved with ``save_to_disk`` (offline) builds the same shards
as the same documents given as jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")
ROOT = Path(__file__).resolve().parents[1]

DOCS = [f"Document number {i} talks about topic {i * 7 % 5} at some length, with a few more words." * (1 + i % 3)
        for i in range(40)]


def build(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline.build", "--tokenizer", "gpt2", "--seq-len", "32",
                           "--val-docs", "5", "--no-progress", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_hf_dataset_on_disk_equals_jsonl(tmp_path):
    hf_dir = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(str(hf_dir))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))

    a = build("--source", "hf", "--input", str(hf_dir), "--out", str(tmp_path / "from_hf"))
    assert a.returncode == 0, a.stderr
    b = build("--source", "jsonl", "--input", str(jsonl), "--out", str(tmp_path / "from_jsonl"))
    assert b.returncode == 0, b.stderr
    for split in ("train", "val"):
        shards_a = sorted((tmp_path / "from_hf" / split).glob("*.tar"))
        shards_b = sorted((tmp_path / "from_jsonl" / split).glob("*.tar"))
        assert shards_a and [p.name for p in shards_a] == [p.name for p in shards_b]
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(shards_a, shards_b))
        manifest = json.loads((tmp_path / "from_hf" / split / "manifest.json").read_text())
        assert manifest["seq_len"] == 32


def test_hf_missing_column_names_it(tmp_path):
    hf_dir = tmp_path / "hf"
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(hf_dir))
    result = build("--source", "hf", "--input", str(hf_dir), "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "no column 'text'" in result.stderr and "Traceback" not in result.stderr
