"""Webdataset shards of token rows: deterministic writing and random-access reading.

A shard is a plain webdataset ``.tar``: one member ``<key>.tokens.npy`` per sample, where the key
is the row's index in its split (10 digits) and the payload is a 1-D ``.npy`` array of
``seq_len`` ids (uint16 or uint32).  Any webdataset reader can stream these files.

Writing goes through ``webdataset.TarWriter`` with a constant mtime, owner and mode, so the same
rows always give the same bytes (idempotent rebuilds), and to a temporary name renamed into place
only when complete, so a shard under its final name is never half written.

Reading does not stream the tar: every member has the same size, so sample ``j`` lies at
``j * stride`` and a shard can be memory-mapped and indexed directly.  That is what makes an exact,
sample-level resume and a global shuffle cheap.  ``ShardFile`` checks the layout before trusting
it (file size, first and last member headers, npy header, end-of-archive block); the tar header
checksums are verified by ``tarfile`` while parsing.  The layout logic is hand-written because
``wids`` (the webdataset indexer) is not installed here and would scan every header.
"""

from __future__ import annotations

import io
import mmap
import os
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds

from data_pipeline.errors import DataError

FIELD = "tokens.npy"
BLOCK = 512
KEY_DIGITS = 10


def _npy_header(seq_len: int, dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros(seq_len, dtype=dtype))
    data = buf.getvalue()
    return data[: len(data) - seq_len * dtype.itemsize]


def sample_key(row_index: int) -> str:
    return f"{row_index:0{KEY_DIGITS}d}"


def write_shard(path: Path, rows: np.ndarray, first_row: int) -> int:
    """Write ``rows`` (n, seq_len) as a shard with keys ``first_row ...``; returns the file size."""
    if rows.ndim != 2 or len(rows) == 0:
        raise DataError(f"shard {path.name}: expected a non-empty (rows, seq_len) array, got {rows.shape}")
    header = _npy_header(rows.shape[1], rows.dtype)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        writer = wds.TarWriter(handle, user="lomdm", group="lomdm", mode=0o444, mtime=0, encoder=False)
        for i, row in enumerate(rows):
            writer.write({"__key__": sample_key(first_row + i), FIELD: header + row.tobytes()})
        writer.close()
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def _parse_header(block: bytes, shard: str, where: str) -> tarfile.TarInfo:
    try:
        return tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.TarError as err:
        raise DataError(f"shard {shard}: corrupt tar header at {where} ({err})") from None


class ShardFile:
    """Random access to the rows of one local shard, after checking its layout.

    Opened lazily and per process (memory maps must not be shared across a fork that happens
    after they were created by a different process's file object).
    """

    def __init__(self, path: Path, *, name: str, samples: int, seq_len: int, dtype: np.dtype,
                 expected_bytes: int | None = None):
        self.path, self.name, self.samples = Path(path), name, samples
        self.seq_len, self.dtype = seq_len, np.dtype(dtype)
        self.expected_bytes = expected_bytes
        self._rows: np.ndarray | None = None
        self._pid = -1

    def __getstate__(self) -> dict:
        """Pickle without the mapping (a spawned loader worker maps the file itself)."""
        state = dict(self.__dict__)
        state["_rows"], state["_pid"] = None, -1
        return state

    def _fail(self, why: str) -> DataError:
        return DataError(f"shard {self.name}: {why}")

    def validate(self) -> None:
        """Check the layout (cheap: a few reads); raises ``DataError`` naming the shard."""
        self._open()

    def _open(self) -> np.ndarray:
        if self._rows is not None and self._pid == os.getpid():
            return self._rows
        if not self.path.is_file():
            raise self._fail(f"missing file {self.path}")
        size = self.path.stat().st_size
        if self.expected_bytes is not None and size != self.expected_bytes:
            raise self._fail(f"size {size} bytes differs from the manifest's {self.expected_bytes} "
                             "(truncated or rewritten)")
        if size < 3 * BLOCK:
            raise self._fail(f"only {size} bytes: truncated")
        with open(self.path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        first = _parse_header(mapped[:BLOCK], self.name, "offset 0")
        stride = BLOCK + -(-first.size // BLOCK) * BLOCK
        payload = mapped[BLOCK:BLOCK + first.size]
        try:
            stream = io.BytesIO(payload)
            version = np.lib.format.read_magic(stream)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = reader(stream)
            data_offset = stream.tell()
        except ValueError as err:
            raise self._fail(f"first sample is not a valid .npy array ({err})") from None
        if shape != (self.seq_len,) or dtype != self.dtype or fortran:
            raise self._fail(f"rows are {dtype}{list(shape)}, the manifest says {self.dtype}[{self.seq_len}]")
        if data_offset + self.seq_len * self.dtype.itemsize != first.size:
            raise self._fail("sample payload size does not match its .npy header")
        end = self.samples * stride
        if size < end + 2 * BLOCK:
            raise self._fail(f"{size} bytes cannot hold {self.samples} samples of {stride} bytes: truncated")
        last = _parse_header(mapped[end - stride:end - stride + BLOCK], self.name, f"sample {self.samples - 1}")
        if last.size != first.size or not last.name.endswith("." + FIELD) or not first.name.endswith("." + FIELD):
            raise self._fail("members are not equally sized '<key>.tokens.npy' samples")
        try:
            first_key, last_key = int(first.name.split(".")[0]), int(last.name.split(".")[0])
        except ValueError:
            raise self._fail(f"sample keys {first.name!r} / {last.name!r} are not row numbers") from None
        if last_key - first_key != self.samples - 1:
            raise self._fail(f"holds keys {first_key}..{last_key}, expected {self.samples} consecutive samples")
        if any(mapped[end:end + BLOCK]):
            raise self._fail(f"more than the manifest's {self.samples} samples, or no end-of-archive block")
        self._rows = np.ndarray((self.samples, self.seq_len), dtype=self.dtype, buffer=mapped,
                                offset=BLOCK + data_offset, strides=(stride, self.dtype.itemsize))
        self._pid = os.getpid()
        return self._rows

    def read(self, local_indices: np.ndarray) -> np.ndarray:
        """Rows at ``local_indices`` (a copy, in the given order)."""
        return self._open()[local_indices]
