"""The trainer's view of the data: one object with the training stream, validation batches,
decoding and resumable state, built from ``data.*`` config keys.

``data.source = wikipedia_excerpt`` builds (once, cached) webdataset shards of the Wikipedia excerpt
that gensim ships; ``data.source = shards`` reads a manifest built by ``python -m data_pipeline.build``.
``data.verify_checksums`` hashes every shard of both splits against its manifest at start-up.

The training stream is sharded by the *data-parallel* rank and size (``parallel.dp_rank`` /
``dp_size``), not by the process rank: tensor- and pipeline-parallel peers must see the same rows.
Validation batches are global (every rank gets the whole batch and keeps its rows, see
``lomdm_dist.parallel.evaluate``), so their split follows the layout and a row's draws do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ..config import Config


class TrainingData:
    def __init__(self, cfg: Config, *, dp_rank: int, dp_size: int):
        from data_pipeline.corpus import ensure_bundled_corpus
        from data_pipeline.reader import ShardSet, ShardStream, read_manifest
        from data_pipeline.tokenizers import get_tokenizer

        d = cfg.data
        if d.batch_size % dp_size:
            raise ValueError(f"data.batch_size ({d.batch_size}) must be divisible by the data-parallel size ({dp_size})")
        self.tokenizer = get_tokenizer(d.tokenizer)
        if d.source == "wikipedia_excerpt":
            self.train_manifest, self.val_manifest = ensure_bundled_corpus(
                d.cache_dir, d.tokenizer, d.seq_len, d.val_docs, wiki_path=d.path)
        else:
            self.train_manifest = d.path
            self.val_manifest = d.val_path or str(Path(d.path).parent.parent / "val" / "manifest.json")
            read_manifest(self.val_manifest)  # fail early, naming the file
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.eval_batch_size = d.eval_batch_size
        self.stream = ShardStream(self.train_manifest, seed=cfg.train.seed, rank=dp_rank, world_size=dp_size,
                                  batch_size=d.batch_size // dp_size, num_workers=d.num_workers,
                                  skip_corrupt=d.skip_corrupt_shards, expect_seq_len=d.seq_len,
                                  expect_tokenizer_fingerprint=self.tokenizer.fingerprint,
                                  verify_checksums=d.verify_checksums)
        if d.verify_checksums:
            # Once here rather than in every evaluation's pass over the split.
            ShardSet(read_manifest(self.val_manifest), verify_checksums=True)
        self.vocab_size = self.tokenizer.vocab_size
        self.pad_id = self.stream.pad_id

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.stream)

    def eval_batches(self, max_batches: int = 0) -> Iterator[torch.Tensor]:
        """Global validation batches of ``data.eval_batch_size`` rows (the last one may be smaller)."""
        from data_pipeline.reader import iter_eval_batches
        return iter_eval_batches(self.val_manifest, self.eval_batch_size, max_batches=max_batches)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    @property
    def stats(self) -> dict:
        return dict(self.stream.stats)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def restore(self, own_state: dict | None, saved_states: dict[int, Path]) -> None:
        """Continue where a checkpoint left off: this slice's own state when the data-parallel size
        is unchanged, else any saved slice's (checkpoints are taken at step boundaries, where every
        slice has consumed the same number of global batches; the stream converts the position)."""
        if own_state is None and saved_states:
            own_state = torch.load(saved_states[min(saved_states)], map_location="cpu", weights_only=True)
        if own_state is not None:
            self.load_state_dict(own_state)


def build_data(cfg: Config, *, dp_rank: int = 0, dp_size: int = 1) -> TrainingData:
    return TrainingData(cfg, dp_rank=dp_rank, dp_size=dp_size)
