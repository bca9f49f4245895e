"""The JSON manifest of a split: which shards, how many samples, and how they were made.

The manifest is the contract between builder and reader.  It records everything a reader must
check before training on the data (sequence length, tokenizer fingerprint, dtype, pad id) and
everything needed to locate and verify each shard (URL, sample count, byte size, sha256).  Shard
URLs are relative to the manifest, absolute paths, or anything ``webdataset.gopen`` opens
(``http(s)://``, ``pipe:<command>``, ``file:``); remote shards are staged to a local cache once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import numpy as np

from data_pipeline.errors import DataError

MANIFEST_FORMAT = "lomdm-token-shards"
BUILD_VERSION = 1

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str, "build_version": int, "split": str, "seq_len": int, "packing": str,
    "dtype": str, "num_samples": int, "num_tokens": int, "tokenizer": dict, "shards": list,
}
_TOKENIZER_REQUIRED = ("name", "fingerprint", "vocab_size", "bos", "eos", "pad")


def _is_url(location: str) -> bool:
    return location.startswith("pipe:") or urlparse(location).scheme in ("http", "https", "file", "s3", "gs")


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON under a temporary name and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _load_text(location: str) -> str:
    if _is_url(location) and not location.startswith("file:"):
        import webdataset as wds

        try:
            with wds.gopen(location, "rb") as handle:
                return handle.read().decode("utf-8")
        except Exception as err:
            raise DataError(f"manifest {location}: cannot be read ({err})") from None
    path = Path(urlparse(location).path if location.startswith("file:") else location).expanduser()
    if not path.is_file():
        raise DataError(f"manifest {location}: file not found")
    return path.read_text()


def read_manifest(path: str | os.PathLike) -> dict:
    """Load and check a manifest; raises ``DataError`` naming the manifest and the bad field.

    The result has one extra key, ``manifest_location``: where it was read from, against which
    relative shard URLs are resolved.
    """
    location = os.fspath(path)
    try:
        manifest = json.loads(_load_text(location))
    except json.JSONDecodeError as err:
        raise DataError(f"manifest {location}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"manifest {location}: expected a JSON object")
    for key, kind in _REQUIRED.items():
        if key not in manifest:
            raise DataError(f"manifest {location}: missing field '{key}'")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise DataError(f"manifest {location}: field '{key}' has type {type(manifest[key]).__name__}")
    if manifest["format"] != MANIFEST_FORMAT:
        raise DataError(f"manifest {location}: field 'format' is {manifest['format']!r}, expected {MANIFEST_FORMAT!r}")
    if manifest["build_version"] > BUILD_VERSION:
        raise DataError(f"manifest {location}: field 'build_version' {manifest['build_version']} is newer "
                        f"than this reader ({BUILD_VERSION})")
    for key in _TOKENIZER_REQUIRED:
        if key not in manifest["tokenizer"]:
            raise DataError(f"manifest {location}: missing field 'tokenizer.{key}'")
    try:
        np.dtype(manifest["dtype"])
    except TypeError:
        raise DataError(f"manifest {location}: field 'dtype' {manifest['dtype']!r} is not a numpy dtype") from None
    if not manifest["shards"]:
        raise DataError(f"manifest {location}: field 'shards' is empty")
    total = 0
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or "url" not in shard or "samples" not in shard:
            raise DataError(f"manifest {location}: shards[{i}] needs 'url' and 'samples'")
        if not isinstance(shard["samples"], int) or shard["samples"] <= 0:
            raise DataError(f"manifest {location}: shards[{i}] ({shard['url']}) has samples={shard['samples']!r}")
        total += shard["samples"]
    if total != manifest["num_samples"]:
        raise DataError(f"manifest {location}: field 'num_samples' is {manifest['num_samples']} but the "
                        f"shards hold {total}")
    manifest["manifest_location"] = location
    return manifest


def check_expectations(manifest: dict, *, seq_len: int | None, tokenizer_fingerprint: str | None) -> None:
    """Fail when the data was built for another sequence length or vocabulary than the config's."""
    where = manifest.get("manifest_location", "?")
    if seq_len is not None and manifest["seq_len"] != seq_len:
        raise DataError(f"manifest {where}: field 'seq_len' is {manifest['seq_len']} but the config "
                        f"expects {seq_len}")
    found = manifest["tokenizer"]["fingerprint"]
    if tokenizer_fingerprint is not None and found != tokenizer_fingerprint:
        raise DataError(f"manifest {where}: field 'tokenizer.fingerprint' is {found!r} "
                        f"({manifest['tokenizer']['name']}) but the config's tokenizer has {tokenizer_fingerprint!r}")


def shard_location(manifest: dict, url: str) -> str:
    """Absolute path or URL of a shard listed in ``manifest``."""
    if _is_url(url) or os.path.isabs(url):
        return url
    base = manifest["manifest_location"]
    if base.startswith("pipe:"):
        raise DataError(f"manifest {base}: shard {url!r} is relative, which a pipe: manifest cannot resolve")
    if _is_url(base):
        return urljoin(base, url)
    return str(Path(base).expanduser().resolve().parent / url)


def default_cache_dir() -> Path:
    return Path(os.environ.get("LOMDM_SHARD_CACHE", Path.home() / ".cache" / "lomdm_dist" / "shards"))


def local_shard_path(location: str, cache_dir: Path | None = None) -> Path:
    """A local file for a shard: the path itself, or a copy staged once into ``cache_dir``.

    Staging writes a temporary file and renames it, so concurrent ranks on one node at worst fetch
    twice and never read a partial copy.
    """
    if not _is_url(location):
        return Path(location)
    if location.startswith("file:"):
        return Path(urlparse(location).path)
    import webdataset as wds

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    name = hashlib.sha256(location.encode()).hexdigest()[:16] + "-" + Path(urlparse(location).path).name[-60:]
    target = cache / name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with wds.gopen(location, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        raise DataError(f"shard {location}: cannot be fetched ({err})") from None
    os.replace(tmp, target)
    return target


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
