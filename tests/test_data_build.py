"""Shard building: packing recipes counted token by token, idempotence, resume, sources, CLI."""

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sys

import pytest
import webdataset as wds

from data_pipeline.build import main as build_main
from data_pipeline.builder import BuildConfig, build
from data_pipeline.errors import DataError
from data_pipeline.reader import ShardStream, read_manifest
from data_pipeline.sources import SourceSpec, iter_raw_documents, lm1b_detokenize
from data_pipeline.tokenizers import get_tokenizer

WORDS = ("river mountain quiet engine paper lantern orbit violet thunder garden copper "
         "whisper harbor meadow signal").split()


def make_docs(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(count):
        n = int(rng.integers(3, 60))
        docs.append(f"Doc {i}: " + " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), n)) + ".")
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> str:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return str(path)


def rows_via_webdataset(manifest_path: str) -> np.ndarray:
    """All rows of a split in manifest order, read with plain webdataset (not our reader)."""
    manifest = read_manifest(manifest_path)
    base = Path(manifest_path).parent
    urls = [str(base / s["url"]) for s in manifest["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False,
                             nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker).decode()
    samples = list(dataset)
    keys = [int(s["__key__"]) for s in samples]
    assert keys == list(range(len(samples)))
    return np.stack([s["tokens.npy"] for s in samples])


def config(tmp_path: Path, source: SourceSpec, **kw) -> BuildConfig:
    base = dict(tokenizer="gpt2", seq_len=16, out=str(tmp_path / "out"), rows_per_shard=7,
                part_bytes=600, workers=1, progress=False)
    base.update(kw)
    return BuildConfig(source=source, **base)


def test_wrap_packing_keeps_every_token_once_and_holds_out_the_last_docs(tmp_path):
    docs = make_docs(40)
    source = SourceSpec("jsonl", (write_jsonl(tmp_path / "d.jsonl", docs),))
    manifests = build(config(tmp_path, source, val_docs=5))
    tok = get_tokenizer("gpt2")
    for split, split_docs in (("train", docs[:-5]), ("val", docs[-5:])):
        rows = rows_via_webdataset(manifests[split])
        manifest = read_manifest(manifests[split])
        stream = [t for d in split_docs for t in tok.encode(d) + [tok.eos]]  # independent reference
        body = 16 - 2
        assert rows.shape == (len(stream) // body, 16)
        assert rows.dtype == np.uint16 and manifest["dtype"] == "uint16"
        assert (rows[:, 0] == tok.bos).all() and (rows[:, -1] == tok.eos).all()
        assert rows[:, 1:-1].reshape(-1).tolist() == stream[:len(rows) * body]
        assert len(stream) - len(rows) * body < body  # only the final partial chunk is dropped
        assert manifest["dropped_tokens"] == len(stream) - len(rows) * body
        assert manifest["input_documents_dropped"] == 0
        assert manifest["num_documents"] == len(split_docs)
        assert manifest["document_tokens"] == len(stream) - len(split_docs)
        assert manifest["num_samples"] == len(rows) and manifest["num_tokens"] == len(rows) * 16
        assert [s["samples"] for s in manifest["shards"]][:-1] == [7] * (len(manifest["shards"]) - 1)
        assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint and manifest["pad_id"] is None


def test_pad_packing_one_row_per_document_bert(tmp_path):
    lines = ["the cat sat on the mat .", "a much longer sentence " * 10 + "that will be cut .", "short"]
    (tmp_path / "lm1b.txt").write_text("\n".join(lines) + "\n")
    source = SourceSpec("text", (str(tmp_path / "lm1b.txt"),), doc_split="line", detokenize="lm1b")
    manifests = build(config(tmp_path, source, tokenizer="bert-base-uncased", packing="pad", seq_len=12))
    tok = get_tokenizer("bert-base-uncased")
    rows = rows_via_webdataset(manifests["train"])
    assert rows.shape == (3, 12)
    for row, line in zip(rows.tolist(), lines):
        ids = tok.encode(lm1b_detokenize(line))[:10]
        assert row == [tok.bos] + ids + [tok.eos] + [tok.pad] * (10 - len(ids))
    manifest = read_manifest(manifests["train"])
    assert manifest["pad_id"] == tok.pad == 0
    assert manifest["dropped_tokens"] == sum(max(0, len(tok.encode(lm1b_detokenize(x))) - 10) for x in lines) > 0
    stream = ShardStream(manifests["train"], seed=0, rank=0, world_size=1, batch_size=3)
    assert stream.pad_id == 0


def test_pad_packing_needs_a_pad_token(tmp_path):
    source = SourceSpec("jsonl", (write_jsonl(tmp_path / "d.jsonl", make_docs(3)),))
    with pytest.raises(DataError, match="pad token"):
        build(config(tmp_path, source, packing="pad"))


def test_build_is_byte_identical_across_worker_counts_and_reruns(tmp_path):
    source = SourceSpec("jsonl", (write_jsonl(tmp_path / "d.jsonl", make_docs(60)),))
    one = build(config(tmp_path, source, val_docs=4, out=str(tmp_path / "w1")))
    two = build(config(tmp_path, source, val_docs=4, out=str(tmp_path / "w2"), workers=2))
    for split in ("train", "val"):
        a, b = Path(one[split]).parent, Path(two[split]).parent
        names = sorted(p.name for p in a.glob("*.tar"))
        assert len(names) > 1 and names == sorted(p.name for p in b.glob("*.tar"))
        for name in names:
            assert (a / name).read_bytes() == (b / name).read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "w1").rglob("*") if p.is_file()}
    assert build(config(tmp_path, source, val_docs=4, out=str(tmp_path / "w1"))) == one
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "w1").rglob("*") if p.is_file()}
    with tarfile.open(Path(one["train"]).parent / "shard-000000.tar") as tar:
        member = tar.getmembers()[0]
        assert (member.name, member.mtime) == ("0000000000.tokens.npy", 0)


def test_interrupted_build_resumes_and_skips_finished_work(tmp_path):
    source = SourceSpec("jsonl", (write_jsonl(tmp_path / "d.jsonl", make_docs(60)),))
    reference = build(config(tmp_path, source, out=str(tmp_path / "ref")))
    ref_dir = Path(reference["train"]).parent
    cfg = config(tmp_path, source, keep_work=True)
    build(cfg)
    out = Path(cfg.out)
    train = out / "train"
    # Simulate a crash: no manifest, one shard never written, one half-written temp file, one part
    # lost in the middle of tokenisation.
    (train / "manifest.json").unlink()
    (train / "shard-000001.tar").unlink()
    (train / ".shard-000001.tar.tmp-999").write_bytes(b"partial")
    (out / "work" / "main" / "parts.json").unlink()
    (out / "work" / "main" / "part-000002.npz").unlink()
    kept = train / "shard-000000.tar"
    before = kept.stat().st_mtime_ns
    manifests = build(cfg)
    assert kept.stat().st_mtime_ns == before  # finished shards are not rewritten
    assert not list(train.glob(".*tmp*"))
    names = sorted(p.name for p in ref_dir.glob("*.tar"))
    assert names == sorted(p.name for p in train.glob("*.tar"))
    for name in names:
        assert (ref_dir / name).read_bytes() == (train / name).read_bytes()
    assert read_manifest(manifests["train"])["shards"] == read_manifest(reference["train"])["shards"]


def test_truncated_shard_in_a_finished_build_is_rebuilt(tmp_path):
    source = SourceSpec("jsonl", (write_jsonl(tmp_path / "d.jsonl", make_docs(30)),))
    cfg = config(tmp_path, source)
    manifests = build(cfg)
    shard = Path(manifests["train"]).parent / "shard-000000.tar"
    original = shard.read_bytes()
    os.truncate(shard, 1000)
    build(cfg)
    assert shard.read_bytes() == original


def test_other_settings_in_the_same_directory_are_refused(tmp_path):
    source = SourceSpec("jsonl", (write_jsonl(tmp_path / "d.jsonl", make_docs(30)),))
    build(config(tmp_path, source))
    with pytest.raises(DataError, match="differing: seq_len"):
        build(config(tmp_path, source, seq_len=32))
    manifests = build(config(tmp_path, source, seq_len=32), overwrite=True)
    assert read_manifest(manifests["train"])["seq_len"] == 32


def test_too_few_documents_are_reported(tmp_path):
    source = SourceSpec("jsonl", (write_jsonl(tmp_path / "d.jsonl", make_docs(3)),))
    with pytest.raises(DataError, match="val_docs=3 leaves no training documents"):
        build(config(tmp_path, source, val_docs=3))


def test_sources_text_parquet_and_errors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.txt").write_text("first doc\nsecond line\n\nsecond para\n")
    (tmp_path / "a" / "2.txt").write_text("other file\n")
    docs = lambda **kw: list(iter_raw_documents(SourceSpec("text", (str(tmp_path / "a"),), **kw)))
    assert docs() == ["first doc\nsecond line\n\nsecond para\n", "other file\n"]
    assert docs(doc_split="line") == ["first doc", "second line", "second para", "other file"]
    assert docs(doc_split="blankline") == ["first doc\nsecond line", "second para", "other file"]
    glob_docs = list(iter_raw_documents(SourceSpec("text", (str(tmp_path / "a" / "*.txt"),))))
    assert glob_docs == docs()

    pq.write_table(pa.table({"content": ["x y", "z"], "n": [1, 2]}), tmp_path / "p.parquet")
    assert list(iter_raw_documents(SourceSpec("parquet", (str(tmp_path / "p.parquet"),), text_field="content"))) \
        == ["x y", "z"]
    with pytest.raises(DataError, match="no column 'text'"):
        list(iter_raw_documents(SourceSpec("parquet", (str(tmp_path / "p.parquet"),))))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_raw_documents(SourceSpec("jsonl", (str(bad),))))
    bad.write_text('{"body": "ok"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: no field 'text'"):
        list(iter_raw_documents(SourceSpec("jsonl", (str(bad),))))
    with pytest.raises(DataError, match="no such file"):
        list(iter_raw_documents(SourceSpec("text", (str(tmp_path / "missing*.txt"),))))
    with pytest.raises(DataError, match="unknown kind"):
        SourceSpec("csv", ("x",))


def test_hf_source_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes ``import datasets`` raise ImportError
    with pytest.raises(DataError, match="'datasets' package is not installed"):
        list(iter_raw_documents(SourceSpec("hf", ("Skylion007/openwebtext",))))


def test_lm1b_detokenizer_follows_mdlm_rules():
    assert lm1b_detokenize("He said , \" it 's fine \" today .") == "He said, \"it's fine\" today."
    assert lm1b_detokenize("see ( below ) now") == "see (below) now"
    assert lm1b_detokenize("Visit http : / / example.com now !") == "Visit http://example.com now!"
    assert lm1b_detokenize("Costs $ 5 ; or £ 3 : ok ?") == "Costs $5; or £3: ok?"


def test_cli_builds_and_reports(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", make_docs(30), field="body")
    code = build_main(["--source", "jsonl", "--input", data, "--text-field", "body", "--tokenizer", "gpt2",
                       "--seq-len", "16", "--val-docs", "3", "--out", str(tmp_path / "cli"),
                       "--workers", "1", "--rows-per-shard", "8", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out
    assert read_manifest(tmp_path / "cli" / "val" / "manifest.json")["num_documents"] == 3
    assert build_main(["--source", "jsonl", "--input", data, "--tokenizer", "gpt2", "--seq-len", "16",
                       "--out", str(tmp_path / "cli2"), "--no-progress"]) == 2
    assert "no field 'text'" in capsys.readouterr().err


def test_links_and_repeated_documents_are_read_once_before_the_split(tmp_path, capsys):
    """A directory with symbolic links to its files, a copy of a file under a new name, an input
    named twice and documents repeated inside a file: each text reaches the shards once, the first
    occurrence is kept (so a repeat of a training document cannot land in the validation split),
    and both kinds of repeat are counted in the manifests and said on stderr.  The reference is
    built by hand from the distinct texts."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = make_docs(12, seed=3)
    for i, text in enumerate(texts[:10]):
        (corpus / f"{i:02d}.txt").write_text(text)
    (corpus / "10.txt").write_text(texts[1])          # same text, other name: a content repeat
    (corpus / "11.txt").symlink_to(corpus / "03.txt")  # the same file under a second name
    (corpus / "12.txt").write_text(texts[10])
    (corpus / "13.txt").symlink_to(corpus / "12.txt")
    (corpus / "14.txt").write_text(texts[11])
    lines = tmp_path / "lines.txt"                     # a second input, one document per line; its last
    phrase = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda"    # line, a training
    lines.write_text(f"{phrase}\n{phrase}\n{texts[2]}\n")                         # document, would be validation
    source = SourceSpec("text", (str(corpus), str(lines), str(corpus / "00.txt")), doc_split="line")
    manifests = build(config(tmp_path, source, val_docs=2, workers=2, part_bytes=200))
    err = capsys.readouterr().err
    # files: 11.txt, 13.txt and the input 00.txt named again; documents: 10.txt, the phrase, texts[2]
    assert "skipped 3 repeated file names" in err and "and 3 documents whose exact text" in err

    distinct = texts[:10] + [texts[10], texts[11], phrase]
    tok = get_tokenizer("gpt2")
    for split, split_docs in (("train", distinct[:-2]), ("val", distinct[-2:])):
        stream = [t for d in split_docs for t in tok.encode(d) + [tok.eos]]
        rows = rows_via_webdataset(manifests[split])
        assert rows[:, 1:-1].reshape(-1).tolist() == stream[:len(rows) * 14]
        manifest = read_manifest(manifests[split])
        assert manifest["num_documents"] == len(split_docs)
        assert manifest["duplicate_files_skipped"] == 3
        assert manifest["duplicate_documents_skipped"] == 3
    files = json.loads((tmp_path / "out" / "build.json").read_text())["settings"]["source"]["files"]
    assert len(files) == len({f for f, _ in files}) == 14

    # one worker, and a build resumed after losing its part list and a part, give the same bytes
    again = build(config(tmp_path, source, val_docs=2, out=str(tmp_path / "again"), keep_work=True))
    work = tmp_path / "again" / "work" / "main"
    (work / "parts.json").unlink()
    (work / "part-000001.npz").unlink()
    for split in ("train", "val"):
        (tmp_path / "again" / split / "manifest.json").unlink()
    again = build(config(tmp_path, source, val_docs=2, out=str(tmp_path / "again"), keep_work=True))
    for split in ("train", "val"):
        a, b = Path(manifests[split]).parent, Path(again[split]).parent
        assert sorted(p.name for p in a.glob("*.tar")) == sorted(p.name for p in b.glob("*.tar"))
        for shard in a.glob("*.tar"):
            assert shard.read_bytes() == (b / shard.name).read_bytes()
        assert read_manifest(again[split])["duplicate_documents_skipped"] == 3


def test_dedup_off_keeps_repeats(tmp_path):
    docs = make_docs(6)
    source = SourceSpec("jsonl", (write_jsonl(tmp_path / "d.jsonl", docs + docs[:2]),))
    on = read_manifest(build(config(tmp_path, source, out=str(tmp_path / "on")))["train"])
    off = read_manifest(build(config(tmp_path, source, out=str(tmp_path / "off"), dedup=False))["train"])
    assert (on["num_documents"], on["duplicate_documents_skipped"]) == (6, 2)
    assert (off["num_documents"], off["duplicate_documents_skipped"]) == (8, 0)


def test_a_linked_file_is_read_once_by_the_source(tmp_path):
    (tmp_path / "a.txt").write_text("one\n")
    (tmp_path / "b.txt").symlink_to(tmp_path / "a.txt")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("two\n")
    source = SourceSpec("text", (str(tmp_path), str(tmp_path / "sub" / "*.txt")))
    assert list(iter_raw_documents(source)) == ["one\n", "two\n"]
