"""The trainer's view of the data: one object with the training stream, validation batches,
decoding and resumable state, built from ``data.*`` config keys.

``data.source = wikipedia_excerpt`` builds (once, cached) webdataset shards of the Wikipedia excerpt
that gensim ships; ``data.source = shards`` reads a manifest built by ``python -m data_pipeline.build``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ..config import Config


class TrainingData:
    def __init__(self, cfg: Config, *, rank: int, world_size: int):
        from data_pipeline.corpus import ensure_bundled_corpus
        from data_pipeline.reader import ShardStream, read_manifest
        from data_pipeline.tokenizers import get_tokenizer

        d = cfg.data
        if d.batch_size % world_size:
            raise ValueError(f"data.batch_size ({d.batch_size}) must be divisible by the data-parallel size ({world_size})")
        self.tokenizer = get_tokenizer(d.tokenizer)
        if d.source == "wikipedia_excerpt":
            self.train_manifest, self.val_manifest = ensure_bundled_corpus(
                d.cache_dir, d.tokenizer, d.seq_len, d.val_docs, wiki_path=d.path)
        else:
            self.train_manifest = d.path
            self.val_manifest = d.val_path or str(Path(d.path).parent.parent / "val" / "manifest.json")
            read_manifest(self.val_manifest)  # fail early, naming the file
        self.rank, self.world_size = rank, world_size
        self.eval_batch_size = d.eval_batch_size
        self.stream = ShardStream(self.train_manifest, seed=cfg.train.seed, rank=rank, world_size=world_size,
                                  batch_size=d.batch_size // world_size, num_workers=d.num_workers,
                                  skip_corrupt=d.skip_corrupt_shards, expect_seq_len=d.seq_len,
                                  expect_tokenizer_fingerprint=self.tokenizer.fingerprint)
        self.vocab_size = self.tokenizer.vocab_size
        self.pad_id = self.stream.pad_id

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.stream)

    def eval_batches(self, max_batches: int = 0) -> Iterator[torch.Tensor]:
        from data_pipeline.reader import iter_eval_batches
        return iter_eval_batches(self.val_manifest, self.eval_batch_size, rank=self.rank,
                                 world_size=self.world_size, max_batches=max_batches)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @property
    def stats(self) -> dict:
        return dict(self.stream.stats)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


def build_data(cfg: Config, *, rank: int = 0, world_size: int = 1) -> TrainingData:
    return TrainingData(cfg, rank=rank, world_size=world_size)
