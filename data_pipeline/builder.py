"""The shard builder behind ``python -m data_pipeline.build``: tokenise, pack, write, resume.

Two resumable phases, both spread over ``--workers`` processes:

1. **Tokenise.**  The parent reads raw documents in order and cuts them into *parts* of about
   ``part_bytes`` of text (the cut depends only on the data, never on the worker count).  A worker
   cleans, tokenises and writes each part to ``work/<stream>/part-NNNNNN.npz`` (token ids and
   document lengths), atomically.  A resumed build re-reads the inputs but skips finished parts.
2. **Pack and write.**  With every part's document lengths known, the validation documents (the
   last ``val_docs``, as the OWT recipe does, or a separate validation input) and each shard's
   row range are fixed.  A worker assembles a shard's rows straight from the parts and writes the
   tar atomically; a resumed build skips shards that exist and pass the layout check.

Repeated text is read once.  Input files are identified by their real path (a symbolic link next
to its target is skipped, see ``sources.input_files``), and with ``dedup`` (the default) a raw
document whose exact text an earlier document of the same input stream already had is skipped in
the parent, before the cut into parts and so before the train/validation split: the same document
can no longer sit in both splits.  Both counts are logged and recorded in each split's manifest
(``duplicate_files_skipped``, ``duplicate_documents_skipped``).  The decision depends only on the
documents and their order, so builds stay byte-identical whatever the worker count, and resumable.

The manifests are written last, so a split with a manifest is complete.  Everything that shapes the
bytes (inputs, tokenizer fingerprint, sequence length, packing, validation split, shard size) is in
``build.json``'s settings; resuming into a directory built with other settings is refused, naming the
setting.  A finished build run again checks its shards and returns without writing: the same
settings always give byte-identical shards, whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from data_pipeline.errors import DataError
from data_pipeline.manifest import (BUILD_VERSION, MANIFEST_FORMAT, read_manifest, settings_digest,
                                    sha256_file, write_json_atomic)
from data_pipeline.packing import (PACKINGS, check_seq_len, join_with_eos, pad_rows, token_dtype, wrap_rows,
                                   wrapped_row_count)
from data_pipeline.shards import ShardFile, write_shard
from data_pipeline.sources import SourceSpec, clean_document, input_files, iter_raw_documents
from data_pipeline.tokenizers import get_tokenizer

DEFAULT_ROWS_PER_SHARD = 16384
DEFAULT_PART_BYTES = 8 << 20


@dataclass(frozen=True)
class BuildConfig:
    """One build: where the text comes from, how it becomes rows, where shards go."""

    source: SourceSpec
    tokenizer: str
    seq_len: int
    out: str
    packing: str = "wrap"
    val_docs: int = 0
    """Hold out the last ``val_docs`` (kept) documents as the validation split."""
    val_source: Optional[SourceSpec] = None
    """A separate validation input (LM1B's test split); exclusive with ``val_docs``."""
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
    part_bytes: int = DEFAULT_PART_BYTES
    workers: int = 1
    progress: bool = True
    keep_work: bool = False
    """Keep the tokenised parts after a successful build (they allow re-sharding without re-tokenising)."""
    dedup: bool = True
    """Skip a raw document whose exact text (blake2b digest) an earlier document of the same input
    stream had, so no document is trained on twice or validated on after being trained on.  The
    parent holds one 16-byte digest per document (about 100 bytes each in a Python set)."""

    def __post_init__(self) -> None:
        check_seq_len(self.seq_len)
        if self.packing not in PACKINGS:
            raise DataError(f"packing: unknown value {self.packing!r} (expected one of {PACKINGS})")
        if self.val_docs < 0:
            raise DataError(f"val_docs must be >= 0, got {self.val_docs}")
        if self.val_docs and self.val_source is not None:
            raise DataError("val_docs and a separate validation input are exclusive: choose one")
        if self.rows_per_shard <= 0 or self.part_bytes <= 0 or self.workers <= 0:
            raise DataError("rows_per_shard, part_bytes and workers must be positive")


def _source_settings(source: Optional[SourceSpec]) -> Optional[dict]:
    """A source's settings plus its files' names and sizes, so changed inputs are noticed."""
    if source is None:
        return None
    settings = dataclasses.asdict(source)
    if source.kind != "hf":
        settings["files"] = [[str(p.resolve()), p.stat().st_size] for p in input_files(source)[0]]
    return settings


def build_settings(cfg: BuildConfig) -> dict:
    tok = get_tokenizer(cfg.tokenizer)
    return {"build_version": BUILD_VERSION, "source": _source_settings(cfg.source),
            "val_source": _source_settings(cfg.val_source),
            "tokenizer": {"name": cfg.tokenizer, "fingerprint": tok.fingerprint},
            "seq_len": cfg.seq_len, "packing": cfg.packing, "val_docs": cfg.val_docs,
            "rows_per_shard": cfg.rows_per_shard, "part_bytes": cfg.part_bytes, "dedup": cfg.dedup}


# ----------------------------------------------------------------------------------- phase 1


@dataclass(frozen=True)
class PartInfo:
    index: int
    docs: int
    tokens: int
    dropped: int = 0
    """Raw documents cleaning rejected (empty, redirects, stubs): counted, never silently lost."""
    duplicates: int = 0
    """Raw documents skipped while this part was filled because an earlier one had the same text."""


def _part_path(work: Path, index: int) -> Path:
    return work / f"part-{index:06d}.npz"


def _tokenize_part(work: str, index: int, source: SourceSpec, tokenizer_name: str,
                   raw_docs: list[str], duplicates: int = 0) -> PartInfo:
    """Worker: clean, tokenise and store one part (token ids and per-document lengths)."""
    tok = get_tokenizer(tokenizer_name)
    texts = [t for t in (clean_document(source, raw) for raw in raw_docs) if t is not None]
    encoded = tok.encode_batch(texts)
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.fromiter((i for ids in encoded for i in ids), dtype=token_dtype(tok.vocab_size),
                         count=int(lengths.sum()))
    path = _part_path(Path(work), index)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.savez(handle, tokens=tokens, lengths=lengths, dropped=np.int64(len(raw_docs) - len(texts)))
    os.replace(tmp, path)
    return PartInfo(index, len(lengths), int(lengths.sum()), len(raw_docs) - len(texts), duplicates)


def _read_part_info(work: Path, index: int) -> PartInfo:
    with np.load(_part_path(work, index)) as part:
        lengths = part["lengths"]
        return PartInfo(index, len(lengths), int(lengths.sum()), int(part["dropped"]))


def _document_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _iter_part_texts(source: SourceSpec, part_bytes: int, dedup: bool = True) -> Iterator[tuple[list[str], int]]:
    """Raw documents cut into parts of about ``part_bytes``; each part with the number of repeated
    documents skipped after its first document (``dedup``: the first occurrence is kept).  A full
    part is held back until the next kept document, so repeats at the end of the input are counted
    in the last part."""
    batch: list[str] = []
    size = duplicates = 0
    full: Optional[tuple[list[str], int]] = None
    seen: set[bytes] = set()
    for raw in iter_raw_documents(source):
        if dedup:
            digest = _document_digest(raw)
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
        if full is not None:
            yield full
            full = None
        batch.append(raw)
        size += len(raw)
        if size >= part_bytes:
            full, batch, size, duplicates = (batch, duplicates), [], 0, 0
    if full is not None:
        yield full[0], full[1] + duplicates
    elif batch:
        yield batch, duplicates


class _Runner:
    """Runs tasks inline (one worker) or on a process pool with a bounded number in flight.

    The bound gives back-pressure: ``Pool.imap`` would read the whole corpus into memory ahead of
    the workers.  Workers are forked where the platform can: a fork server or spawn would re-run
    an unguarded calling script (no ``if __name__ == "__main__"``) and re-import every module per
    worker.  The workers only run numpy, tokenizer and file code, which takes no lock another
    thread of the parent (torch, tqdm) could hold at fork time.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None
        if workers > 1:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)

    def map(self, fn: Callable, tasks: Iterable[tuple], on_done: Callable) -> None:
        if self.pool is None:
            for task in tasks:
                on_done(fn(*task))
            return
        pending: list[Future] = []
        for task in tasks:
            pending.append(self.pool.submit(fn, *task))
            while len(pending) >= 2 * self.workers:
                on_done(pending.pop(0).result())
        for future in pending:
            on_done(future.result())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _tokenize_stream(cfg: BuildConfig, source: SourceSpec, work: Path, runner: _Runner,
                     digest: str) -> list[PartInfo]:
    """Phase 1 for one input stream; returns its parts (reusing finished ones)."""
    work.mkdir(parents=True, exist_ok=True)
    done_file = work / "parts.json"
    if done_file.is_file():
        done = json.loads(done_file.read_text())
        if done.get("digest") == digest and all(_part_path(work, p[0]).is_file() for p in done["parts"]):
            return [PartInfo(*p) for p in done["parts"]]
    infos: dict[int, PartInfo] = {}
    bar = tqdm(desc=f"tokenise {work.name}", unit="doc", disable=not cfg.progress, file=sys.stderr)

    def tasks() -> Iterator[tuple]:
        for index, (texts, duplicates) in enumerate(_iter_part_texts(source, cfg.part_bytes, cfg.dedup)):
            if _part_path(work, index).is_file():
                infos[index] = dataclasses.replace(_read_part_info(work, index), duplicates=duplicates)
                bar.update(infos[index].docs)
                continue
            yield (str(work), index, source, cfg.tokenizer, texts, duplicates)

    def done(info: PartInfo) -> None:
        infos[info.index] = info
        bar.update(info.docs)

    try:
        runner.map(_tokenize_part, tasks(), done)
    finally:
        bar.close()
    parts = [infos[i] for i in sorted(infos)]
    write_json_atomic(done_file, {"digest": digest, "parts": [dataclasses.astuple(p) for p in parts]})
    return parts


# ----------------------------------------------------------------------------------- phase 2


@functools.lru_cache(maxsize=4)
def _load_part(work: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and document offsets of one part (cached: consecutive shards share parts)."""
    with np.load(_part_path(Path(work), index)) as part:
        tokens, lengths = part["tokens"], part["lengths"]
    return tokens, np.concatenate([[0], np.cumsum(lengths)])


@functools.lru_cache(maxsize=4)
def _split_lengths(work: str, parts: tuple[PartInfo, ...], doc_start: int, doc_end: int) -> np.ndarray:
    """Lengths of documents ``[doc_start, doc_end)`` of a stream, read from the parts' length arrays."""
    pieces, first = [], 0
    for part in parts:
        lo, hi = max(doc_start - first, 0), min(doc_end - first, part.docs)
        if lo < hi:
            with np.load(_part_path(Path(work), part.index)) as data:
                pieces.append(data["lengths"][lo:hi])
        first += part.docs
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class SplitDocs:
    """Documents ``[doc_start, doc_end)`` of a tokenised stream, read lazily from its parts.

    Only paths and counts, so it pickles cheaply to shard-writing workers; the parts and length
    arrays they load are cached per process by the two functions above.
    """

    work: str
    parts: tuple[PartInfo, ...]
    doc_start: int
    doc_end: int
    eos: int

    @property
    def num_docs(self) -> int:
        return self.doc_end - self.doc_start

    def lengths(self) -> np.ndarray:
        return _split_lengths(self.work, self.parts, self.doc_start, self.doc_end)

    def docs(self, start: int, stop: int) -> list[np.ndarray]:
        """Token arrays of split-local documents ``[start, stop)``."""
        out: list[np.ndarray] = []
        a, b, first = self.doc_start + start, self.doc_start + stop, 0
        for part in self.parts:
            lo, hi = max(a - first, 0), min(b - first, part.docs)
            if lo < hi:
                tokens, offsets = _load_part(self.work, part.index)
                out.extend(tokens[offsets[j]:offsets[j + 1]] for j in range(lo, hi))
            first += part.docs
        return out

    def stream_length(self) -> int:
        """Tokens of the wrap stream (each document plus its EOS)."""
        return int(self.lengths().sum()) + self.num_docs

    def read_stream(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of this split's wrap stream."""
        stream_offsets = np.concatenate([[0], np.cumsum(self.lengths() + 1)])
        first = int(np.searchsorted(stream_offsets, start, side="right")) - 1
        last = int(np.searchsorted(stream_offsets, stop, side="left"))
        docs = self.docs(first, last)
        dtype = docs[0].dtype
        joined = join_with_eos(docs, self.eos, dtype)
        base = int(stream_offsets[first])
        return joined[start - base:stop - base]


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    row_start: int
    row_stop: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}.tar"


def _shard_rows(task: ShardTask, docs: SplitDocs, cfg_seq_len: int, packing: str, bos: int, eos: int,
                pad: Optional[int], dtype: np.dtype) -> np.ndarray:
    if packing == "wrap":
        body = cfg_seq_len - 2
        chunk = docs.read_stream(task.row_start * body, task.row_stop * body)
        return wrap_rows(chunk, cfg_seq_len, bos, eos)
    return pad_rows(docs.docs(task.row_start, task.row_stop), cfg_seq_len, bos, eos, pad, dtype)


def _write_shard_task(out: str, task: ShardTask, docs: SplitDocs, seq_len: int, packing: str,
                      tokenizer_name: str) -> tuple[ShardTask, dict]:
    """Worker: assemble and write one shard; returns its manifest entry."""
    tok = get_tokenizer(tokenizer_name)
    dtype = token_dtype(tok.vocab_size)
    rows = _shard_rows(task, docs, seq_len, packing, tok.bos, tok.eos, tok.pad, dtype)
    path = Path(out) / task.split / task.name
    size = write_shard(path, rows, task.row_start)
    return task, {"url": task.name, "samples": task.row_stop - task.row_start, "bytes": size,
                  "sha256": sha256_file(path)}


def _existing_shard_entry(out: Path, task: ShardTask, seq_len: int, dtype: np.dtype) -> Optional[dict]:
    path = out / task.split / task.name
    if not path.is_file():
        return None
    samples = task.row_stop - task.row_start
    try:
        ShardFile(path, name=task.name, samples=samples, seq_len=seq_len, dtype=dtype).validate()
    except DataError:
        return None  # an unusable leftover: rewrite it
    return {"url": task.name, "samples": samples, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _split_plan(cfg: BuildConfig, split: str, docs: SplitDocs) -> list[ShardTask]:
    if cfg.packing == "wrap":
        rows = wrapped_row_count(docs.stream_length(), cfg.seq_len)
    else:
        rows = docs.num_docs
    if rows == 0:
        raise DataError(f"split {split}: {docs.num_docs} documents are too few for one row of "
                        f"seq_len {cfg.seq_len}")
    return [ShardTask(split, i, start, min(start + cfg.rows_per_shard, rows))
            for i, start in enumerate(range(0, rows, cfg.rows_per_shard))]


# ----------------------------------------------------------------------------------- driver


@contextlib.contextmanager
def _build_lock(out: Path, progress: bool) -> Iterator[None]:
    """One build per output directory at a time; a crashed holder's lock dies with it."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another build of {out} to finish ...", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_settings(out: Path, settings: dict, digest: str, overwrite: bool) -> None:
    state_file = out / "build.json"
    if not state_file.is_file():
        return
    previous = json.loads(state_file.read_text())
    if previous.get("digest") == digest:
        return
    if overwrite:
        for name in ("work", "train", "val", "build.json"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        return
    old = previous.get("settings", {})
    differing = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    raise DataError(f"build directory {out} holds a build with other settings (differing: "
                    f"{', '.join(differing)}); use another --out or --overwrite")


def _finished_manifests(out: Path, digest: str, splits: Sequence[str]) -> Optional[dict[str, str]]:
    """Manifest paths when a complete build with these settings exists and its shards check out."""
    paths = {}
    for split in splits:
        path = out / split / "manifest.json"
        if not path.is_file():
            return None
        try:
            manifest = read_manifest(path)
        except DataError:
            return None
        if manifest.get("build_settings_digest") != digest:
            return None
        for shard in manifest["shards"]:
            shard_path = out / split / shard["url"]
            if not shard_path.is_file() or shard_path.stat().st_size != shard.get("bytes"):
                return None
        paths[split] = str(path)
    return paths


def build(cfg: BuildConfig, *, overwrite: bool = False) -> dict[str, str]:
    """Build (or resume, or confirm) the shards of ``cfg``; returns ``{split: manifest path}``."""
    out = Path(cfg.out).expanduser().resolve()
    tok = get_tokenizer(cfg.tokenizer)
    if cfg.packing == "pad" and tok.pad is None:
        raise DataError(f"packing 'pad' needs a tokenizer with a pad token; {cfg.tokenizer} has none")
    settings = build_settings(cfg)
    digest = settings_digest(settings)
    splits = ["train"] + (["val"] if cfg.val_docs or cfg.val_source else [])
    with _build_lock(out, cfg.progress):
        _check_settings(out, settings, digest, overwrite)
        finished = _finished_manifests(out, digest, splits)
        if finished is not None:
            return finished
        write_json_atomic(out / "build.json", {"digest": digest, "settings": settings, "complete": False})
        runner = _Runner(cfg.workers)
        try:
            result = _build_locked(cfg, out, tok, settings, digest, runner)
        finally:
            runner.close()
        write_json_atomic(out / "build.json", {"digest": digest, "settings": settings, "complete": True})
        if not cfg.keep_work:
            shutil.rmtree(out / "work", ignore_errors=True)
        return result


def _build_locked(cfg: BuildConfig, out: Path, tok, settings: dict, digest: str,
                  runner: _Runner) -> dict[str, str]:
    main_work = str(out / "work" / "main")
    main_parts = tuple(_tokenize_stream(cfg, cfg.source, Path(main_work), runner, digest))
    total_docs = sum(p.docs for p in main_parts)
    split_docs: dict[str, SplitDocs] = {}
    if cfg.val_docs:
        if total_docs <= cfg.val_docs:
            raise DataError(f"val_docs={cfg.val_docs} leaves no training documents: the input has "
                            f"{total_docs} documents after cleaning")
        split_docs["train"] = SplitDocs(main_work, main_parts, 0, total_docs - cfg.val_docs, tok.eos)
        split_docs["val"] = SplitDocs(main_work, main_parts, total_docs - cfg.val_docs, total_docs, tok.eos)
    else:
        split_docs["train"] = SplitDocs(main_work, main_parts, 0, total_docs, tok.eos)
    if cfg.val_source is not None:
        val_work = str(out / "work" / "val")
        val_parts = tuple(_tokenize_stream(cfg, cfg.val_source, Path(val_work), runner, digest))
        split_docs["val"] = SplitDocs(val_work, val_parts, 0, sum(p.docs for p in val_parts), tok.eos)
    manifests = {}
    for split, docs in split_docs.items():
        separate = split == "val" and cfg.val_source is not None
        source = settings["val_source"] if separate else settings["source"]
        spec = cfg.val_source if separate else cfg.source
        repeated_files = input_files(spec)[1] if spec.kind != "hf" else 0
        manifests[split] = _write_split(cfg, out, split, docs, tok, source, digest, runner, repeated_files)
        repeated_docs = sum(p.duplicates for p in docs.parts)
        if (split == "train" or separate) and (repeated_files or repeated_docs):
            # said even without progress output: the input held the same text more than once
            said = [f"{repeated_files} repeated file names (links to a file already read)"] if repeated_files else []
            said += [f"{repeated_docs} documents whose exact text an earlier document had"] if repeated_docs else []
            print(f"{'validation' if separate else 'input'}: skipped {' and '.join(said)}", file=sys.stderr)
    return manifests


def _write_split(cfg: BuildConfig, out: Path, split: str, docs: SplitDocs, tok, source: dict, digest: str,
                 runner: _Runner, repeated_files: int = 0) -> str:
    """Phase 2 for one split: write the missing shards, then the manifest; returns its path."""
    dtype = token_dtype(tok.vocab_size)
    (out / split).mkdir(parents=True, exist_ok=True)
    plan = _split_plan(cfg, split, docs)
    entries: dict[int, dict] = {}
    bar = tqdm(total=len(plan), desc=f"shards {split}", unit="shard", disable=not cfg.progress, file=sys.stderr)

    def tasks() -> Iterator[tuple]:
        for task in plan:
            entry = _existing_shard_entry(out, task, cfg.seq_len, dtype)
            if entry is not None:
                entries[task.index] = entry
                bar.update(1)
                continue
            yield (str(out), task, docs, cfg.seq_len, cfg.packing, cfg.tokenizer)

    def done(result: tuple[ShardTask, dict]) -> None:
        entries[result[0].index] = result[1]
        bar.update(1)

    try:
        runner.map(_write_shard_task, tasks(), done)
    finally:
        bar.close()
    for leftover in (out / split).glob(".shard-*.tmp-*"):
        leftover.unlink(missing_ok=True)
    num_samples = plan[-1].row_stop
    lengths = docs.lengths()
    if cfg.packing == "wrap":
        dropped_tokens = docs.stream_length() - num_samples * (cfg.seq_len - 2)
    else:
        dropped_tokens = int(np.maximum(lengths - (cfg.seq_len - 2), 0).sum())
    manifest = {
        "format": MANIFEST_FORMAT, "build_version": BUILD_VERSION, "split": split, "source": source,
        "tokenizer": tok.describe(), "seq_len": cfg.seq_len, "packing": cfg.packing,
        "pad_id": tok.pad if cfg.packing == "pad" else None, "dtype": dtype.name,
        "num_samples": num_samples, "num_tokens": num_samples * cfg.seq_len,
        "num_documents": docs.num_docs, "document_tokens": int(lengths.sum()),
        # What did not make it into rows, so no loss is silent: the wrap remainder or the tokens cut
        # by truncation, and the input documents cleaning rejected (for the whole input stream).
        "dropped_tokens": dropped_tokens,
        "input_documents_dropped": sum(p.dropped for p in docs.parts),
        # Repeats read once (whole input stream): names of a file already read (symbolic links,
        # overlapping inputs) and documents whose text an earlier document had.
        "duplicate_files_skipped": repeated_files,
        "duplicate_documents_skipped": sum(p.duplicates for p in docs.parts),
        "build_settings_digest": digest,
        "shards": [entries[t.index] for t in plan],
    }
    path = out / split / "manifest.json"
    write_json_atomic(path, manifest)
    if cfg.progress:
        print(f"{split}: {docs.num_docs} documents -> {num_samples} rows; {dropped_tokens} tokens dropped "
              f"({cfg.packing}), {manifest['input_documents_dropped']} input documents rejected by cleaning",
              file=sys.stderr)
    return str(path)
