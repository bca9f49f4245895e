"""Training and evaluation streams over built shards, with exact sample-level resume.

``ShardStream`` is the training input of one data-parallel rank.  Its order is the global policy of
``data_pipeline.order`` (one shuffled global sequence per seed, global batches cut from it, rank
``r`` takes rows ``[r*b, (r+1)*b)`` of each), so:

* every sample is read exactly once per epoch across all ranks and loader workers, and the
  global batch at step ``s`` is the same for every world size dividing the global batch;
* the whole position is one integer (rows this rank has consumed), so ``state_dict`` is tiny and a
  restored stream continues with exactly the row an uninterrupted one would read next.  A state
  saved at a batch boundary may be loaded with another world size or rank (same global batch):
  the position is stored as global samples consumed;
* shards are read by memory-mapped random access (see ``data_pipeline.shards``); shards behind
  URLs or ``pipe:`` commands are staged once into a local cache before the first batch.

Bad data: a missing or corrupt shard raises ``DataError`` naming it, or with ``skip_corrupt`` is
logged, counted in ``stats["corrupt_shards_skipped"]`` and left out of the sample set.  All shards
are checked when the stream is built, so every rank and worker agrees on the sample set and the
order is never disturbed mid-epoch.  A token id outside the vocabulary raises ``DataError``.

``iter_eval_batches`` is a single, unshuffled pass over a validation split with the same
global-batch split over ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.errors import DataError
from data_pipeline.manifest import (check_expectations, local_shard_path, read_manifest, sha256_file,
                                    shard_location)
from data_pipeline.order import EpochOrders, rank_positions
from data_pipeline.shards import ShardFile

__all__ = ["DataError", "ShardStream", "iter_eval_batches", "read_manifest", "valid_mask"]

log = logging.getLogger(__name__)
STATE_FORMAT = "lomdm-shardstream"
STATE_VERSION = 1


class ShardSet:
    """The usable shards of a manifest as one indexable array of rows."""

    def __init__(self, manifest: dict, *, skip_corrupt: bool = False, cache_dir: Optional[str] = None,
                 verify_checksums: bool = False):
        self.manifest = manifest
        self.seq_len = manifest["seq_len"]
        self.vocab_size = manifest["tokenizer"]["vocab_size"]
        dtype = np.dtype(manifest["dtype"])
        self.files: list[ShardFile] = []
        self.skipped: list[str] = []
        for entry in manifest["shards"]:
            location = shard_location(manifest, entry["url"])
            try:
                path = local_shard_path(location, Path(cache_dir) if cache_dir else None)
                shard = ShardFile(path, name=location, samples=entry["samples"], seq_len=self.seq_len,
                                  dtype=dtype, expected_bytes=entry.get("bytes"))
                shard.validate()
                if verify_checksums and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
                    raise DataError(f"shard {location}: sha256 differs from the manifest (corrupt)")
            except DataError as err:
                if not skip_corrupt:
                    raise
                log.warning("skipping %s", err)
                self.skipped.append(location)
                continue
            self.files.append(shard)
        if not self.files:
            raise DataError(f"manifest {manifest['manifest_location']}: no usable shard left "
                            f"({len(self.skipped)} skipped as missing or corrupt)")
        self.starts = np.cumsum([0] + [f.samples for f in self.files])
        self.num_samples = int(self.starts[-1])

    def read(self, samples: np.ndarray) -> np.ndarray:
        """Rows of the given sample indices, in that order, as int64."""
        out = np.empty((len(samples), self.seq_len), dtype=np.int64)
        which = np.searchsorted(self.starts, samples, side="right") - 1
        for shard_index in np.unique(which):
            chosen = np.nonzero(which == shard_index)[0]
            shard = self.files[int(shard_index)]
            rows = shard.read(samples[chosen] - self.starts[shard_index])
            if rows.size and int(rows.max()) >= self.vocab_size:
                raise DataError(f"shard {shard.name}: token id {int(rows.max())} is outside the vocabulary "
                                f"of {self.vocab_size} (corrupt data)")
            out[chosen] = rows
        return out


@dataclass(frozen=True)
class _RankOrder:
    """Everything needed to produce a rank's rows; picklable for loader workers."""

    shards: ShardSet
    seed: int
    rank: int
    world_size: int
    batch_size: int

    def rows(self, first_row: int, count: int, orders: EpochOrders) -> torch.Tensor:
        positions = rank_positions(first_row, count, rank=self.rank, batch_size=self.batch_size,
                                   world_size=self.world_size)
        return torch.from_numpy(self.shards.read(orders.samples(positions)))

    def chunk(self, start_row: int, index: int) -> tuple[int, int]:
        """Local rows of chunk ``index`` counted from ``start_row``: chunk 0 completes the current batch."""
        b = self.batch_size
        head = b - start_row % b
        if index == 0:
            return start_row, head
        return start_row + head + (index - 1) * b, b


class _WorkerChunks(IterableDataset):
    """Loader-worker side: worker ``w`` makes chunks ``w, w + n, ...`` of the rank's sequence."""

    def __init__(self, order: _RankOrder, start_row: int):
        self.order, self.start_row = order, start_row

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        orders = EpochOrders(self.order.shards.num_samples, self.order.seed)
        index = worker
        while True:
            first, count = self.order.chunk(self.start_row, index)
            yield self.order.rows(first, count, orders)
            index += workers


class ShardStream:
    """The infinite, multi-epoch training stream of one data-parallel rank (int64 ``(b, seq_len)``).

    ``batch_size`` is this rank's rows per step (the global batch divided by ``world_size``).  The
    rows of a batch at step ``s`` are global rows ``s * G + rank * b + i`` of the global sequence
    (``G = b * world_size``), which is what counter-based per-row randomness should key on.
    ``num_workers`` loader processes prefetch whole batches; one live iterator per stream at a time.
    ``cache_dir`` is where shards behind URLs are staged; ``verify_checksums`` also compares every
    shard's sha256 with the manifest at start-up (reads all data once).
    """

    def __init__(self, manifest: str, *, seed: int, rank: int, world_size: int, batch_size: int,
                 num_workers: int = 0, skip_corrupt: bool = False, expect_seq_len: Optional[int] = None,
                 expect_tokenizer_fingerprint: Optional[str] = None, cache_dir: Optional[str] = None,
                 verify_checksums: bool = False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"ShardStream: rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise DataError(f"ShardStream: batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise DataError(f"ShardStream: num_workers must be >= 0, got {num_workers}")
        self.manifest = read_manifest(manifest)
        check_expectations(self.manifest, seq_len=expect_seq_len, tokenizer_fingerprint=expect_tokenizer_fingerprint)
        shards = ShardSet(self.manifest, skip_corrupt=skip_corrupt, cache_dir=cache_dir,
                          verify_checksums=verify_checksums)
        self._order = _RankOrder(shards, int(seed), rank, world_size, batch_size)
        self._orders = EpochOrders(shards.num_samples, int(seed))
        self.seed, self.rank, self.world_size, self.batch_size = int(seed), rank, world_size, batch_size
        self.num_workers = num_workers
        self.seq_len: int = self.manifest["seq_len"]
        self.vocab_size: int = self.manifest["tokenizer"]["vocab_size"]
        self.pad_id: Optional[int] = self.manifest.get("pad_id")
        self.num_samples: int = shards.num_samples
        self.global_batch_size = batch_size * world_size
        self._rows_consumed = 0
        self.stats: dict = {"epoch": 0, "samples_seen": 0, "corrupt_shards_skipped": len(shards.skipped)}

    # ------------------------------------------------------------------ position

    def _advance(self, rows: int) -> None:
        self._rows_consumed += rows
        next_position = rank_positions(self._rows_consumed, 1, rank=self.rank, batch_size=self.batch_size,
                                       world_size=self.world_size)[0]
        self.stats["epoch"] = int(next_position // self.num_samples)
        self.stats["samples_seen"] = self._rows_consumed

    def state_dict(self) -> dict:
        """The position (and what it is only valid for); store it in the training checkpoint."""
        step, row = divmod(self._rows_consumed, self.batch_size)
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "seed": self.seed,
                "num_samples": self.num_samples, "global_batch_size": self.global_batch_size,
                "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank,
                "step": step, "row_in_step": row, "global_samples": step * self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; raises ``DataError`` naming the field that makes it inapplicable."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError("ShardStream.load_state_dict: not a ShardStream state (field 'format')")
        for key in ("seed", "num_samples"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"ShardStream.load_state_dict: field '{key}' is {state.get(key)!r} but this "
                                f"stream has {getattr(self, key)!r}")
        row = int(state["row_in_step"])
        if state["global_batch_size"] == self.global_batch_size:
            step = int(state["step"])
        elif row == 0 and state["global_samples"] % self.global_batch_size == 0:
            step = int(state["global_samples"]) // self.global_batch_size
        else:
            raise DataError(f"ShardStream.load_state_dict: field 'global_batch_size' is "
                            f"{state['global_batch_size']} but this stream has {self.global_batch_size}, and "
                            f"{state['global_samples']} consumed samples are not a whole number of its batches")
        if row and state["batch_size"] != self.batch_size:
            raise DataError("ShardStream.load_state_dict: a mid-batch position (field 'row_in_step') needs the "
                            f"same batch_size ({state['batch_size']} saved, {self.batch_size} now)")
        self._rows_consumed = step * self.batch_size + row
        self._advance(0)

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches of ``batch_size`` rows (the first one shorter if resumed mid-batch), forever."""
        if self.num_workers == 0:
            while True:
                first, count = self._order.chunk(self._rows_consumed, 0)
                batch = self._order.rows(first, count, self._orders)
                self._advance(count)
                yield batch
        loader = DataLoader(_WorkerChunks(self._order, self._rows_consumed), batch_size=None,
                            num_workers=self.num_workers, persistent_workers=False)
        iterator = iter(loader)
        try:
            for batch in iterator:
                self._advance(len(batch))
                yield batch
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def samples(self) -> Iterator[torch.Tensor]:
        """Single rows (``(seq_len,)``) of the same sequence; the position advances row by row."""
        while True:
            first, count = self._order.chunk(self._rows_consumed, 0)
            for row in self._order.rows(first, count, self._orders):
                self._advance(1)
                yield row


def valid_mask(rows: torch.Tensor, pad_id: Optional[int]) -> torch.Tensor:
    """``True`` where a position holds a real token (everywhere for packed data)."""
    if pad_id is None:
        return torch.ones_like(rows, dtype=torch.bool)
    return rows != pad_id


def iter_eval_batches(manifest: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                      max_batches: int = 0, skip_corrupt: bool = False,
                      cache_dir: Optional[str] = None) -> Iterator[torch.Tensor]:
    """Deterministic single pass over a validation split (no shuffle), disjoint across ranks; the last batch may be smaller.

    Samples are taken in manifest order.  Evaluation batch ``s`` is the ``R`` samples from ``s*B``
    on (``B = batch_size * world_size``, ``R = B`` except at the end of the split) and rank ``r``
    takes its contiguous slice ``[s*B + r*R//W, s*B + (r+1)*R//W)``: ``[r*b, (r+1)*b)`` for full
    batches, near-equal parts of the last one.  The union over ranks is the whole split (or its first
    ``max_batches`` global batches) in order, the same for every world size, and every rank yields
    the same number of batches, so per-batch collectives (FSDP, all-reduce) stay matched; a rank's
    last batch is empty (0 rows) only when fewer samples than ranks remain.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"iter_eval_batches: bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
    shards = ShardSet(read_manifest(manifest), skip_corrupt=skip_corrupt, cache_dir=cache_dir)
    global_batch = batch_size * world_size
    steps = -(-shards.num_samples // global_batch)
    if max_batches:
        steps = min(steps, max_batches)
    for step in range(steps):
        first = step * global_batch
        rows = min(global_batch, shards.num_samples - first)
        start, stop = first + rank * rows // world_size, first + (rank + 1) * rows // world_size
        yield torch.from_numpy(shards.read(np.arange(start, stop, dtype=np.int64)))
