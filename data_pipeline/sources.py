"""Ingestion: turn inputs (files, directories, globs, Hugging Face datasets) into documents.

Reading is split in two so a build can use many cores: ``iter_raw_documents`` runs in the parent
process and only reads (fast: decompression, JSON/XML parsing), while ``clean_document`` runs in
the worker processes next to tokenisation and does the expensive per-document work (Wikipedia
markup removal, LM1B detokenisation).  ``clean_document`` may drop a document (redirects, stubs) by
returning ``None``; document counts are taken after cleaning, so "the last N documents" means the
last N kept documents.

Sources (``SourceSpec.kind``):
* ``text``: plain text files (``.gz``/``.bz2``/``.xz`` too); one document per file, per line or
  per blank-line-separated paragraph (``doc_split``);
* ``jsonl``: one JSON object per line, text in ``text_field``;
* ``parquet``: the ``text_field`` column, read in record batches with ``pyarrow``;
* ``hf``: a Hugging Face dataset by name (``Skylion007/openwebtext``, ``lm1b``) through the
  ``datasets`` package, which is optional: without it this source raises a clear error;
* ``wikipedia``: MediaWiki XML dumps (``.xml.bz2`` or ``.xml``), pages of namespace 0, markup
  removed with gensim's ``filter_wiki``; redirects and pages under 50 words (gensim's
  ``ARTICLE_MIN_WORDS``) are dropped.

Every file is read once, however many names reach it: inputs are identified by their real path
(``os.path.realpath``), so a symbolic link next to its target, or a directory and a glob that
overlap, do not put the same text into the build twice (where it could land in both the training
and the validation split).  Repeated documents with different file names are the builder's job
(it skips documents by content hash).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Optional

from data_pipeline.errors import DataError

SOURCE_KINDS = ("text", "jsonl", "parquet", "hf", "wikipedia")
DOC_SPLITS = ("file", "line", "blankline")
DETOKENIZERS = ("", "lm1b")
WIKI_MIN_WORDS = 50
GENSIM_WIKI_EXCERPT = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass(frozen=True)
class SourceSpec:
    """Where documents come from and how they are cleaned; part of a build's settings."""

    kind: str
    inputs: tuple[str, ...]
    text_field: str = "text"
    doc_split: str = "file"
    hf_split: str = "train"
    detokenize: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise DataError(f"source: unknown kind {self.kind!r} (expected one of {SOURCE_KINDS})")
        if self.doc_split not in DOC_SPLITS:
            raise DataError(f"doc_split: unknown value {self.doc_split!r} (expected one of {DOC_SPLITS})")
        if self.detokenize not in DETOKENIZERS:
            raise DataError(f"detokenize: unknown value {self.detokenize!r} (expected one of {DETOKENIZERS})")
        if not self.inputs:
            raise DataError(f"source {self.kind}: no input given")


def resolve_inputs(spec: str) -> list[Path]:
    """Files named by a path, a directory (all files below it) or a glob, in sorted order."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"input {spec!r}: no such file, or no files in that directory or glob")
    return files


def input_files(source: SourceSpec) -> tuple[list[Path], int]:
    """The files of a file-based source in reading order, each real file once, and how many
    repeated names (symbolic links to a file already listed, overlapping inputs) were skipped."""
    files: list[Path] = []
    seen: set[str] = set()
    repeats = 0
    for spec in source.inputs:
        for path in resolve_inputs(spec):
            real = os.path.realpath(path)
            if real in seen:
                repeats += 1
                continue
            seen.add(real)
            files.append(path)
    return files, repeats


def _open_binary(path: Path) -> IO[bytes]:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def _open_text(path: Path) -> IO[str]:
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8", errors="replace", newline=None)


def _iter_text(path: Path, doc_split: str) -> Iterator[str]:
    with _open_text(path) as handle:
        if doc_split == "file":
            yield handle.read()
        elif doc_split == "line":
            for line in handle:
                if line.strip():
                    yield line.rstrip("\n")
        else:
            paragraph: list[str] = []
            for line in handle:
                if line.strip():
                    paragraph.append(line.rstrip("\n"))
                elif paragraph:
                    yield "\n".join(paragraph)
                    paragraph = []
            if paragraph:
                yield "\n".join(paragraph)


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{path}:{line_no}: no field {field!r} (set the text field name)")
            value = record[field]
            if not isinstance(value, str):
                raise DataError(f"{path}:{line_no}: field {field!r} is {type(value).__name__}, not text")
            yield value


def _iter_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    if field not in parquet.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (columns: {parquet.schema_arrow.names})")
    for batch in parquet.iter_batches(columns=[field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value


def _iter_hf(name: str, split: str, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"source hf ({name}): the 'datasets' package is not installed; "
                        "install it, or export the dataset to jsonl/parquet and use those sources") from None
    if Path(name).is_dir():
        dataset = datasets.load_from_disk(name)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
    else:
        dataset = datasets.load_dataset(name, split=split)
    if field not in dataset.column_names:
        raise DataError(f"source hf ({name}): no column {field!r} (columns: {dataset.column_names})")
    for record in dataset:
        yield record[field]


def _iter_wikipedia_raw(path: Path) -> Iterator[str]:
    from gensim.corpora.wikicorpus import extract_pages

    with _open_binary(path) as handle:
        try:
            for _title, text, _page_id in extract_pages(handle, filter_namespaces=("0",)):
                yield text
        except Exception as err:  # ElementTree / bz2 errors: name the file
            raise DataError(f"{path}: not a readable MediaWiki XML dump ({type(err).__name__}: {err})") from None


def iter_raw_documents(source: SourceSpec) -> Iterator[str]:
    """Raw documents in a deterministic order (inputs in order, files sorted within each, every
    real file once: see ``input_files``)."""
    if source.kind == "hf":
        for name in source.inputs:
            yield from _iter_hf(name, source.hf_split, source.text_field)
        return
    for path in input_files(source)[0]:
        if source.kind == "text":
            yield from _iter_text(path, source.doc_split)
        elif source.kind == "jsonl":
            yield from _iter_jsonl(path, source.text_field)
        elif source.kind == "parquet":
            yield from _iter_parquet(path, source.text_field)
        else:
            yield from _iter_wikipedia_raw(path)


_WIKI_BOLD_ITALIC = re.compile(r"'{2,}")
_WIKI_HEADING = re.compile(r"^[ \t]*(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_wikipedia(raw: str) -> Optional[str]:
    """Article text of one page's wikitext, or ``None`` for redirects and stubs."""
    from gensim.corpora.wikicorpus import filter_wiki

    if raw.lstrip().lower().startswith("#redirect"):
        return None
    text = filter_wiki(raw)
    text = _WIKI_BOLD_ITALIC.sub("", text)
    text = _WIKI_HEADING.sub(r"\2", text)
    text = _BLANK_RUNS.sub("\n\n", text).strip()
    if len(text.split()) < WIKI_MIN_WORDS:
        return None
    return text


def lm1b_detokenize(text: str) -> str:
    """Undo LM1B's Moses-style tokenisation; the rules of MDLM's ``lm1b_detokenizer``."""
    x = text.replace("http : / / ", "http://")
    x = x.replace("https : / / ", "https://")
    x = re.sub(r" \'(\w+)", r"'\1", x)
    x = re.sub(r" (\w+) \. ", r" \1. ", x)
    x = re.sub(r" (\w+) \.$", r" \1.", x)
    x = x.replace(" ? ", "? ")
    x = re.sub(r" \?$", "?", x)
    x = x.replace(" ! ", "! ")
    x = re.sub(r" \!$", "!", x)
    x = x.replace(" , ", ", ")
    x = x.replace(" : ", ": ")
    x = x.replace(" ; ", "; ")
    x = x.replace(" / ", "/")
    x = re.sub(r"\" ([^\"]+) \"", r'"\1"', x)
    x = re.sub(r"\' ([^\']+) \'", r"'\1'", x)
    x = re.sub(r"\( ([^\(\)]+) \)", r"(\1)", x)
    x = re.sub(r"\[ ([^\[\]]+) \]", r"[\1]", x)
    x = x.replace("$ ", "$")
    x = x.replace("£ ", "£")
    return x


def clean_document(source: SourceSpec, raw: str) -> Optional[str]:
    """Per-document cleaning done in the worker processes; ``None`` drops the document."""
    text: Optional[str] = clean_wikipedia(raw) if source.kind == "wikipedia" else raw
    if text is not None and source.detokenize == "lm1b":
        text = lm1b_detokenize(text)
    if text is None or not text.strip():
        return None
    return text


def gensim_wikipedia_excerpt() -> str:
    """Path of the enwiki XML excerpt in gensim's test data (real text, CC BY-SA)."""
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise DataError("the bundled Wikipedia excerpt needs the 'gensim' package")
    path = Path(spec.origin).parent / "test" / "test_data" / GENSIM_WIKI_EXCERPT
    if not path.is_file():
        raise DataError(f"the bundled Wikipedia excerpt is missing from gensim: {path}")
    return str(path)
