"""The streaming reader: coverage, the global-batch invariant, exact resume, bad data.

Shards here are written directly (row ``i`` starts with token ``i``, so a row names its sample) and
the manifest is written by hand, independent of the builder.
"""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.errors import DataError
from data_pipeline.reader import ShardStream, iter_eval_batches, read_manifest, valid_mask
from data_pipeline.shards import write_shard

SEQ_LEN = 8
VOCAB = 50257
COUNTS = (17, 30, 25, 31)  # 103 samples: no global batch below divides it
N = sum(COUNTS)
FINGERPRINT = "f" * 16


def make_dataset(root: Path, counts=COUNTS, name="manifest.json", **overrides) -> str:
    root.mkdir(parents=True, exist_ok=True)
    shards, first = [], 0
    for i, count in enumerate(counts):
        rows = (np.arange(first, first + count)[:, None] + np.arange(SEQ_LEN)[None, :]).astype(np.uint16)
        path = root / f"shard-{i:06d}.tar"
        size = write_shard(path, rows, first)
        shards.append({"url": path.name, "samples": count, "bytes": size})
        first += count
    manifest = {"format": "lomdm-token-shards", "build_version": 1, "split": "train", "seq_len": SEQ_LEN,
                "packing": "wrap", "pad_id": None, "dtype": "uint16", "num_samples": first,
                "num_tokens": first * SEQ_LEN, "shards": shards,
                "tokenizer": {"name": "gpt2", "fingerprint": FINGERPRINT, "vocab_size": VOCAB,
                              "bos": 50256, "eos": 50256, "pad": None}}
    manifest.update(overrides)
    (root / name).write_text(json.dumps(manifest))
    return str(root / name)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    return make_dataset(tmp_path_factory.mktemp("shards"))


def ids(batch: torch.Tensor) -> list[int]:
    """Sample index of each row (its first token), after checking the row is intact."""
    assert batch.dtype == torch.int64 and batch.shape[-1] == SEQ_LEN
    rows = batch.reshape(-1, SEQ_LEN)
    assert torch.equal(rows - rows[:, :1], torch.arange(SEQ_LEN).expand_as(rows))
    return rows[:, 0].tolist()


def global_batches(manifest, world_size, global_batch, steps, seed=0, num_workers=0):
    """Per step, the rank batches concatenated (rank 0 first)."""
    per_rank = []
    for rank in range(world_size):
        stream = ShardStream(manifest, seed=seed, rank=rank, world_size=world_size,
                             batch_size=global_batch // world_size, num_workers=num_workers)
        iterator = iter(stream)
        per_rank.append([ids(next(iterator)) for _ in range(steps)])
        iterator.close()
    return [sum((per_rank[r][s] for r in range(world_size)), []) for s in range(steps)]


def test_global_batch_is_the_same_for_world_sizes_1_and_2(manifest):
    steps = 25  # 250 samples: more than two epochs, batches straddle epoch ends
    one = global_batches(manifest, 1, 10, steps)
    two = global_batches(manifest, 2, 10, steps)
    assert one == two
    flat = sum(one, [])
    # Each epoch (consecutive runs of N positions) visits every sample exactly once.
    assert sorted(flat[:N]) == list(range(N))
    assert sorted(flat[N:2 * N]) == list(range(N))
    assert flat[:N] != flat[N:2 * N]  # a new order each epoch
    assert flat[:N] != list(range(N))  # shuffled


def test_two_ranks_two_workers_cover_an_epoch_exactly_once(manifest):
    steps = -(-N // 10)
    with_workers = global_batches(manifest, 2, 10, steps, num_workers=2)
    assert with_workers == global_batches(manifest, 1, 10, steps)  # workers never reorder
    flat = sum(with_workers, [])
    assert sorted(flat[:N]) == list(range(N))
    # The ranks read disjoint rows of every global batch.
    for batch in with_workers:
        assert len(set(batch)) == len(batch)


def test_seed_changes_the_order_and_only_the_seed(manifest):
    a = global_batches(manifest, 1, 10, 5, seed=1)
    b = global_batches(manifest, 1, 10, 5, seed=1)
    c = global_batches(manifest, 1, 10, 5, seed=2)
    assert a == b and a != c


@pytest.mark.parametrize("k", [0, 1, 4, 5, 13, 52, 121])
@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_resume_after_k_samples_continues_exactly(manifest, k, rank, world_size):
    kwargs = dict(seed=3, rank=rank, world_size=world_size, batch_size=5)
    reference = ShardStream(manifest, **kwargs).samples()
    expected = [ids(next(reference)) for _ in range(k + 12)]
    first = ShardStream(manifest, **kwargs)
    rows = first.samples()
    assert [ids(next(rows)) for _ in range(k)] == expected[:k]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = ShardStream(manifest, **kwargs)
    resumed.load_state_dict(state)
    assert [ids(next(resumed.samples())) for _ in range(1)] == expected[k:k + 1]
    again = ShardStream(manifest, **kwargs)
    again.load_state_dict(state)
    batches = iter(again)
    tail = ids(next(batches)) + ids(next(batches))  # the first batch completes the interrupted one
    assert tail == sum(expected[k:k + len(tail)], [])


def test_resume_with_workers_at_batch_boundaries(manifest):
    kwargs = dict(seed=5, rank=1, world_size=2, batch_size=4)
    uninterrupted = iter(ShardStream(manifest, num_workers=2, **kwargs))
    expected = [ids(next(uninterrupted)) for _ in range(40)]
    uninterrupted.close()
    for k in (3, 17, 30):
        stream = ShardStream(manifest, num_workers=2, **kwargs)
        iterator = iter(stream)
        assert [ids(next(iterator)) for _ in range(k)] == expected[:k]
        state = stream.state_dict()
        iterator.close()  # stops the workers, which had prefetched ahead
        assert stream.stats["samples_seen"] == 4 * k
        assert stream.stats["epoch"] == (k * 8 + 4) // N
        restored = ShardStream(manifest, num_workers=0, **kwargs)
        restored.load_state_dict(state)
        rest = iter(restored)
        assert [ids(next(rest)) for _ in range(40 - k)] == expected[k:]


def test_state_moves_to_another_world_size_with_the_same_global_batch(manifest):
    two = ShardStream(manifest, seed=0, rank=0, world_size=2, batch_size=5)
    iterator = iter(two)
    for _ in range(7):
        next(iterator)
    one = ShardStream(manifest, seed=0, rank=0, world_size=1, batch_size=10)
    one.load_state_dict(two.state_dict())
    assert ids(next(iter(one))) == global_batches(manifest, 1, 10, 8)[7]
    other_batch = ShardStream(manifest, seed=0, rank=0, world_size=1, batch_size=3)
    with pytest.raises(DataError, match="global_batch_size"):
        other_batch.load_state_dict(two.state_dict())
    other_seed = ShardStream(manifest, seed=9, rank=0, world_size=2, batch_size=5)
    with pytest.raises(DataError, match="'seed'"):
        other_seed.load_state_dict(two.state_dict())


def test_eval_batches_cover_the_split_in_order_for_any_world_size(manifest):
    single = [ids(b) for b in iter_eval_batches(manifest, 10)]
    assert sum(single, []) == list(range(N))
    assert [len(b) for b in single] == [10] * 10 + [3]
    for world_size, b in ((3, 4), (2, 5), (4, 26)):
        ranks = [[ids(x) for x in iter_eval_batches(manifest, b, rank=r, world_size=world_size)]
                 for r in range(world_size)]
        steps = -(-N // (b * world_size))
        assert all(len(r) == steps for r in ranks)  # equal counts: per-batch collectives stay matched
        merged = [row for s in range(steps) for r in range(world_size) for row in ranks[r][s]]
        assert merged == list(range(N))
        last = [len(ranks[r][-1]) for r in range(world_size)]
        assert max(last) - min(last) <= 1
    assert sum((ids(b) for b in iter_eval_batches(manifest, 10, max_batches=2)), []) == list(range(20))


def test_stream_properties_and_valid_mask(manifest):
    stream = ShardStream(manifest, seed=0, rank=0, world_size=1, batch_size=2,
                         expect_seq_len=SEQ_LEN, expect_tokenizer_fingerprint=FINGERPRINT)
    assert (stream.seq_len, stream.vocab_size, stream.pad_id, stream.num_samples) == (SEQ_LEN, VOCAB, None, N)
    batch = next(iter(stream))
    assert valid_mask(batch, None).all()
    padded = torch.tensor([[5, 6, 0, 0]])
    assert valid_mask(padded, 0).tolist() == [[True, True, False, False]]


def test_mismatched_manifest_names_the_field(manifest):
    with pytest.raises(DataError, match=r"field 'seq_len' is 8 but the config expects 16"):
        ShardStream(manifest, seed=0, rank=0, world_size=1, batch_size=2, expect_seq_len=16)
    with pytest.raises(DataError, match=r"field 'tokenizer.fingerprint'"):
        ShardStream(manifest, seed=0, rank=0, world_size=1, batch_size=2, expect_tokenizer_fingerprint="0" * 16)
    with pytest.raises(DataError, match="rank 2"):
        ShardStream(manifest, seed=0, rank=2, world_size=2, batch_size=2)


def test_bad_manifests_are_named(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_manifest(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(tmp_path / "bad.json")
    path = make_dataset(tmp_path / "d", num_samples=5)
    with pytest.raises(DataError, match="'num_samples' is 5 but the shards hold 103"):
        read_manifest(path)
    data = json.loads(Path(path).read_text())
    del data["seq_len"]
    Path(path).write_text(json.dumps(data))
    with pytest.raises(DataError, match="missing field 'seq_len'"):
        read_manifest(path)


def _corrupt_dataset(tmp_path, damage) -> tuple[str, Path]:
    path = make_dataset(tmp_path)
    victim = tmp_path / "shard-000002.tar"
    damage(victim)
    return path, victim


@pytest.mark.parametrize("damage,why", [
    (lambda p: p.unlink(), "missing"),
    (lambda p: os.truncate(p, p.stat().st_size // 2), "truncated"),
    (lambda p: p.write_bytes(b"\x07" * 512 + p.read_bytes()[512:]), "size|header"),
])
def test_missing_or_corrupt_shard_fails_naming_it_or_is_skipped_and_counted(tmp_path, damage, why, caplog):
    path, victim = _corrupt_dataset(tmp_path, damage)
    with pytest.raises(DataError, match=rf"shard .*shard-000002\.tar.*({why})"):
        ShardStream(path, seed=0, rank=0, world_size=1, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.reader"):
        stream = ShardStream(path, seed=0, rank=0, world_size=1, batch_size=4, skip_corrupt=True)
    assert "shard-000002.tar" in caplog.text
    assert stream.stats["corrupt_shards_skipped"] == 1
    assert stream.num_samples == N - COUNTS[2]
    lost = set(range(COUNTS[0] + COUNTS[1], COUNTS[0] + COUNTS[1] + COUNTS[2]))
    seen = sum((ids(b) for b, _ in zip(stream, range(-(-stream.num_samples // 4)))), [])
    assert sorted(seen[:stream.num_samples]) == sorted(set(range(N)) - lost)


def test_corrupt_header_with_right_size_is_detected(tmp_path):
    def damage(p: Path) -> None:
        data = bytearray(p.read_bytes())
        data[100:108] = b"garbage!"  # inside the first tar header: its checksum no longer matches
        p.write_bytes(bytes(data))
    path, _ = _corrupt_dataset(tmp_path, damage)
    with pytest.raises(DataError, match=r"shard-000002\.tar: corrupt tar header"):
        ShardStream(path, seed=0, rank=0, world_size=1, batch_size=4)


def test_out_of_vocabulary_token_is_reported_with_its_shard(tmp_path):
    path = make_dataset(tmp_path, tokenizer={"name": "x", "fingerprint": FINGERPRINT, "vocab_size": 20,
                                             "bos": 0, "eos": 0, "pad": None})
    with pytest.raises(DataError, match=r"shard .*shard-00000\d\.tar: token id \d+ is outside the vocabulary"):
        list(zip(iter_eval_batches(path, 8), range(20)))


def test_pipe_urls_are_staged_and_read(tmp_path, manifest):
    data = json.loads(Path(manifest).read_text())
    base = Path(manifest).parent
    for shard in data["shards"]:
        shard["url"] = f"pipe:cat {base / shard['url']}"
    remote = tmp_path / "remote.json"
    remote.write_text(json.dumps(data))
    stream = ShardStream(str(remote), seed=0, rank=0, world_size=1, batch_size=10, cache_dir=str(tmp_path / "cache"))
    local = ShardStream(manifest, seed=0, rank=0, world_size=1, batch_size=10)
    assert ids(next(iter(stream))) == ids(next(iter(local)))
    assert len(list((tmp_path / "cache").iterdir())) == len(COUNTS)
