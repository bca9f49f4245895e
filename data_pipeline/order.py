"""The sample order of training: one global order, cut into global batches, split over ranks.

Policy (what the distributed engine relies on):

* Epoch ``e`` visits every sample exactly once, in the order ``epoch_permutation(N, seed, e)``.
  Epochs are concatenated into one infinite *global sequence*; position ``p`` of it is sample
  ``perm_{p // N}[p % N]``.  Nothing is dropped when ``N`` is not a multiple of the global batch:
  the batch that straddles an epoch boundary ends epoch ``e`` and starts epoch ``e + 1``.
* Global batch ``s`` is positions ``[s * G, (s + 1) * G)`` with ``G = batch_size * world_size``, and
  rank ``r`` takes rows ``[r * b, (r + 1) * b)`` of it (``b`` = per-rank batch size).  Concatenating
  the ranks' batches (rank 0 first) therefore gives the same global batch for every world size that
  divides ``G``, and the ranks read disjoint samples.
* Loader workers of one rank split that rank's batches round-robin (worker ``w`` makes the rank's
  chunks ``w, w + num_workers, ...``); ``torch.utils.data.DataLoader`` returns them in that order,
  so workers only prefetch, never reorder.

The permutation is a sort by a counter-based hash (splitmix64 of seed, epoch and index) rather than
``numpy.random.Generator.permutation``: numpy does not promise the same stream across versions, and
the order must survive a resume on a machine with another numpy.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: a permutation of ``range(num_samples)`` (int64)."""
    with np.errstate(over="ignore"):
        base = splitmix64(splitmix64(np.array([seed % (1 << 64)], dtype=np.uint64)) + np.uint64(epoch))
        keys = splitmix64(base + np.arange(num_samples, dtype=np.uint64))
    return np.argsort(keys, kind="stable")


def rank_positions(first_row: int, count: int, *, rank: int, batch_size: int, world_size: int) -> np.ndarray:
    """Global-sequence positions of a rank's local rows ``first_row .. first_row + count - 1``.

    A rank's local row ``k`` is row ``k % b`` of its slice of global batch ``k // b``.
    """
    local = np.arange(first_row, first_row + count, dtype=np.int64)
    step, row = np.divmod(local, batch_size)
    return step * (batch_size * world_size) + rank * batch_size + row


class EpochOrders:
    """Global position -> sample index, caching the permutation of the current epochs."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = epoch_permutation(self.num_samples, self.seed, epoch)
        return self._cache[epoch]

    def samples(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, self.num_samples)
        out = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            out[chosen] = self.permutation(int(epoch))[offsets[chosen]]
        return out
