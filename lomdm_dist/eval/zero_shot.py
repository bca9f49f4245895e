"""The zero-shot perplexity suite of MDLM and BD3LM: eight corpora a model never trained on.

Each corpus is read through Hugging Face ``datasets`` (the hub name below, or a local copy),
detokenised (``detokenizers``), tokenised with the checkpoint's tokenizer (GPT-2 for the papers'
OpenWebText models) and laid out as MDLM does with ``wrap`` (its OWT setting, used for every
corpus of the table): each document (dataset row) is followed by EOS, and each group of
:data:`MDLM_GROUP_DOCUMENTS` consecutive documents is concatenated, cut into chunks of
``seq_len - 2`` tokens and laid out as rows ``[BOS] chunk [EOS]``, the group's last partial chunk
dropped. That is MDLM's ``_group_texts`` run by ``datasets.map(batched=True)`` with its default
1,000 rows per batch, so a partial chunk is lost per 1,000 documents, not once per corpus. MDLM
also passes ``num_proc`` (one per CPU) to that map, which cuts the dataset into contiguous shards
first and restarts the 1,000-document groups in each, so its row count can still differ by a few
rows with the machine it ran on; this follows one process. Rows are dataset rows as they come:
WikiText's rows are lines, so its empty lines become lone EOS tokens, as in MDLM.
``doc_eos=False`` leaves the EOS after each document out (BD3LM's ``data.insert_valid_eos=False``).
``layout="pad"`` puts one document per row instead (``[BOS] doc [EOS]`` then padding; needs a
tokenizer with a pad token).

Where the data comes from: ``data_dir`` (``--data-dir`` or ``$LOMDM_ZERO_SHOT_DIR``) holding
``<name>/`` per corpus, either a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` folder or
data files (parquet, json/jsonl, arrow, csv) whose names carry the split (``validation-00000-of-
00001.parquet``, ``lambada_test.jsonl``, or a ``<split>/`` folder); without it, the hub name.
Several of the original hub datasets (``ptb_text_only``, ``lm1b``, ``scientific_papers``) are
loading scripts, which ``datasets`` 4+ no longer runs: export them once (``save_to_disk``) and use
the local copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.packing import join_with_eos, pad_rows, wrap_rows

from .detokenizers import DETOKENIZERS

DATA_DIR_VARIABLE = "LOMDM_ZERO_SHOT_DIR"
MDLM_GROUP_DOCUMENTS = 1000
"""Documents per ``_group_texts`` call in MDLM's ``get_dataset`` (kuleshov-group/mdlm
``dataloader.py``): its ``map(group_texts, batched=True)`` keeps ``datasets``' default
``batch_size=1000``, and each call drops its own remainder."""
SUITE = "zero-shot"
LAYOUTS = ("wrap", "pad")


class ZeroShotError(DataError):
    """A zero-shot corpus cannot be named, found or read; the message names it."""


@dataclass(frozen=True)
class ZeroShotCorpus:
    """Where a corpus comes from and how MDLM reads it."""

    name: str
    """The name on the command line (``--data ptb``)."""
    title: str
    """Its column title in the papers' table."""
    hub: str
    """Hugging Face hub dataset."""
    config: str | None
    """Hub configuration (subset)."""
    split: str
    """The split MDLM evaluates (``test`` where the corpus has no validation split, as MDLM picks)."""
    column: str
    """The text column."""
    detokenizer: str | None
    """Key of ``detokenizers.DETOKENIZERS``."""

    def detokenize(self) -> Callable[[str], str] | None:
        return DETOKENIZERS[self.detokenizer] if self.detokenizer else None


CORPORA: dict[str, ZeroShotCorpus] = {c.name: c for c in (
    ZeroShotCorpus("ptb", "PTB", "ptb-text-only/ptb_text_only", None, "validation", "sentence", "ptb"),
    ZeroShotCorpus("wikitext2", "Wikitext-2", "Salesforce/wikitext", "wikitext-2-raw-v1", "validation", "text",
                   "wikitext"),
    ZeroShotCorpus("wikitext103", "Wikitext-103", "Salesforce/wikitext", "wikitext-103-raw-v1", "validation", "text",
                   "wikitext"),
    ZeroShotCorpus("lm1b", "LM1B", "lm1b", None, "test", "text", "lm1b"),
    # OpenAI's lambada_test.jsonl (MDLM downloads that file), as the hub's parquet 'default' subset.
    ZeroShotCorpus("lambada", "Lambada", "EleutherAI/lambada_openai", "default", "test", "text", "lambada"),
    ZeroShotCorpus("ag_news", "AG News", "fancyzhx/ag_news", None, "test", "text", None),
    ZeroShotCorpus("pubmed", "Pubmed", "armanc/scientific_papers", "pubmed", "validation", "article",
                   "scientific_papers"),
    ZeroShotCorpus("arxiv", "Arxiv", "armanc/scientific_papers", "arxiv", "validation", "article",
                   "scientific_papers"),
)}


def is_zero_shot(data: str) -> bool:
    """Whether ``--data`` names the suite or corpora of it (rather than a manifest path)."""
    return data == SUITE or all(name in CORPORA for name in data.split(","))


def resolve_corpora(data: str) -> list[ZeroShotCorpus]:
    """``zero-shot`` (all eight, in the papers' order) or a comma-separated list of names."""
    if data == SUITE:
        return list(CORPORA.values())
    unknown = [name for name in data.split(",") if name not in CORPORA]
    if unknown:
        raise ZeroShotError(f"unknown zero-shot dataset {unknown[0]!r} (known: {SUITE}, {', '.join(CORPORA)})")
    return [CORPORA[name] for name in data.split(",")]


_DATA_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow", ".csv": "csv"}


def _split_files(root: Path, split: str) -> list[Path]:
    """Data files under ``root`` whose name (or a folder on the way) names ``split`` as a word."""
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix not in _DATA_SUFFIXES:
            continue
        words = {w for part in path.relative_to(root).with_suffix("").parts
                 for w in part.replace("-", "_").replace(".", "_").split("_")}
        if split in words:
            found.append(path)
    return found


def _load_local(corpus: ZeroShotCorpus, root: Path, split: str):
    import datasets

    if not root.is_dir():
        raise ZeroShotError(f"zero-shot dataset {corpus.name}: no local copy at {root} (expected a "
                            f"save_to_disk folder or data files of split '{split}')")
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        try:
            loaded = datasets.load_from_disk(str(root))
        except Exception as err:
            raise ZeroShotError(f"zero-shot dataset {corpus.name}: cannot read {root} ({type(err).__name__}: "
                                f"{err})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ZeroShotError(f"zero-shot dataset {corpus.name}: {root} has no split '{split}' "
                                    f"(splits: {', '.join(loaded)})")
            return loaded[split]
        return loaded
    files = _split_files(root, split)
    if not files:
        raise ZeroShotError(f"zero-shot dataset {corpus.name}: no data file of split '{split}' under {root} "
                            f"(looked for {', '.join(_DATA_SUFFIXES)} files with '{split}' in the name)")
    builders = {_DATA_SUFFIXES[f.suffix] for f in files}
    if len(builders) > 1:
        raise ZeroShotError(f"zero-shot dataset {corpus.name}: split '{split}' under {root} mixes file "
                            f"formats ({', '.join(sorted(builders))})")
    try:
        return datasets.load_dataset(builders.pop(), data_files={split: [str(f) for f in files]}, split=split)
    except Exception as err:
        raise ZeroShotError(f"zero-shot dataset {corpus.name}: cannot read {files[0]} ({type(err).__name__}: "
                            f"{err})") from None


def _load_hub(corpus: ZeroShotCorpus, split: str):
    import datasets

    try:
        return datasets.load_dataset(corpus.hub, corpus.config, split=split)
    except Exception as err:
        raise ZeroShotError(f"zero-shot dataset {corpus.name}: cannot load {corpus.hub}"
                            f"{'/' + corpus.config if corpus.config else ''} split '{split}' from the hub "
                            f"({type(err).__name__}: {err}); give a local copy with --data-dir or "
                            f"${DATA_DIR_VARIABLE}") from None


def load_texts(corpus: ZeroShotCorpus, *, data_dir: str | os.PathLike | None = None,
               split: str | None = None) -> list[str]:
    """The corpus' documents (one per dataset row, empty ones kept), detokenised."""
    split = split or corpus.split
    data_dir = data_dir if data_dir is not None else os.environ.get(DATA_DIR_VARIABLE) or None
    dataset = _load_local(corpus, Path(data_dir) / corpus.name, split) if data_dir else _load_hub(corpus, split)
    if corpus.column not in dataset.column_names:
        raise ZeroShotError(f"zero-shot dataset {corpus.name}: no column '{corpus.column}' "
                            f"(columns: {', '.join(dataset.column_names)})")
    texts = ["" if t is None else str(t) for t in dataset[corpus.column]]
    detokenize = corpus.detokenize()
    return [detokenize(t) for t in texts] if detokenize else texts


def layout_rows(docs: list[list[int]], *, seq_len: int, bos: int, eos: int, pad: int | None,
                layout: str = "wrap", doc_eos: bool = True,
                group_documents: int = MDLM_GROUP_DOCUMENTS) -> np.ndarray:
    """int64 rows (N, seq_len) of tokenised documents in MDLM's ``wrap`` or ``pad`` layout; ``wrap``
    packs each group of ``group_documents`` documents on its own and drops the group's tail."""
    dtype = np.dtype(np.int64)
    arrays = [np.asarray(d, dtype=dtype) for d in docs]
    if layout == "pad":
        return pad_rows(arrays, seq_len, bos, eos, pad, dtype)
    if layout != "wrap":
        raise ZeroShotError(f"zero-shot layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    if group_documents <= 0:
        raise ZeroShotError(f"zero-shot wrap: group_documents must be positive, got {group_documents}")
    body = seq_len - 2
    groups = [np.zeros((0, seq_len), dtype)]
    for start in range(0, len(arrays), group_documents):
        group = arrays[start:start + group_documents]
        stream = join_with_eos(group, eos, dtype) if doc_eos else np.concatenate(group)
        groups.append(wrap_rows(stream[: len(stream) // body * body], seq_len, bos, eos))
    return np.concatenate(groups)


def corpus_rows(corpus: ZeroShotCorpus, tokenizer, *, seq_len: int, data_dir: str | os.PathLike | None = None,
                split: str | None = None, layout: str = "wrap", doc_eos: bool = True) -> np.ndarray:
    """Rows of one corpus, ready for the evaluation; an error when the corpus makes no full row."""
    texts = load_texts(corpus, data_dir=data_dir, split=split)
    rows = layout_rows(tokenizer.encode_batch(texts), seq_len=seq_len, bos=tokenizer.bos, eos=tokenizer.eos,
                       pad=tokenizer.pad, layout=layout, doc_eos=doc_eos)
    if not len(rows):
        raise ZeroShotError(f"zero-shot dataset {corpus.name}: {len(texts)} documents make no row of "
                            f"{seq_len} tokens")
    return rows
