"""Checkpoint protocol in one process: a failure on rank 0 reaches every rank as a CheckpointError,
a re-save or a prune killed midway never loses or half-deletes a checkpoint, ``trainer.pt`` is
optional. Crash states are made on disk by hand or by stopping a delete partway."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from lomdm_dist.checkpoint import distributed, protocol
from lomdm_dist.checkpoint.export import load_checkpoint


def _complete(run_dir, step: int, payload: str) -> None:
    """A complete checkpoint of ``step`` holding one file with ``payload``."""
    tmp = protocol.begin_checkpoint(run_dir, step, "t")
    (tmp / "payload.txt").write_text(payload)
    protocol.complete_checkpoint(tmp, step, keep=0)


# ------------------------------------------------------------------------------- errors on rank 0
def test_failure_to_start_a_checkpoint_names_the_path_and_the_error(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(distributed, "begin_checkpoint", disk_full)
    state = {"model": {"w": torch.zeros(2)}}
    with pytest.raises(protocol.CheckpointError,
                       match=re.escape(f"checkpoint {tmp_path}/checkpoints/step-00000007 ") + ".*No space left"):
        distributed.write_checkpoint(tmp_path, 7, state)


def test_failure_to_complete_a_checkpoint_names_the_path_and_the_error(tmp_path, monkeypatch):
    def export_fails(ckpt, out_dir):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(distributed, "export_consolidated", export_fails)
    with pytest.raises(protocol.CheckpointError, match=r"checkpoints/\.tmp-step-00000003-\d+ of step 3 .*"
                                                       r"PermissionError: .*Permission denied"):
        distributed.write_checkpoint(tmp_path, 3, {"model": {"w": torch.zeros(2)}}, export_weights=True)
    assert protocol.complete_checkpoints(tmp_path) == []


def test_rank0_error_is_broadcast_and_raised_on_every_rank(monkeypatch):
    """Rank 0 sends the error instead of a result; another rank (faked: rank 1 with the broadcast
    replaced by what rank 0 sent) raises it instead of using a missing value or hanging."""
    sent = []

    def broadcast_as_rank0(value):
        sent.append(value)
        return value

    def fails():
        raise OSError("boom")

    monkeypatch.setattr(distributed, "_from_rank0", broadcast_as_rank0)
    with pytest.raises(protocol.CheckpointError, match=r"^checkpoint /x failed \(on rank 0\): OSError: boom$"):
        distributed._run_on_rank0(fails, "checkpoint /x failed")
    assert sent == [(False, "OSError: boom")]

    ran = []
    monkeypatch.setattr(distributed, "_rank", lambda: 1)
    monkeypatch.setattr(distributed, "_from_rank0", lambda value: sent[0] if value is None else pytest.fail(value))
    with pytest.raises(protocol.CheckpointError, match=r"^checkpoint /x failed \(on rank 0\): OSError: boom$"):
        distributed._run_on_rank0(lambda: ran.append(1), "checkpoint /x failed")
    assert ran == [], "only rank 0 does the work"
    monkeypatch.setattr(distributed, "_from_rank0", lambda value: (True, "/ckpt/step-00000001"))
    assert distributed._run_on_rank0(lambda: ran.append(1), "unused") == "/ckpt/step-00000001"


# ------------------------------------------------------------------------------- crash recovery
def test_resave_killed_between_its_renames_restores_the_old_checkpoint(tmp_path):
    """Re-saving step 5 moves the old step-5 aside, then renames the new one into place; killed in
    between, the next save finds no step-5 and must put the old one back, not delete it."""
    _complete(tmp_path, 5, "old five")
    root = protocol.checkpoint_root(tmp_path)
    os.rename(root / "step-00000005", root / ".tmp-old-step-00000005-4242")   # the first rename ...
    (root / ".tmp-step-00000005-4242").mkdir()                                  # ... the new one not yet in place
    partial = root / ".tmp-old-step-00000002-4242"                              # moved aside but no marker: junk
    partial.mkdir()
    (partial / "payload.txt").write_text("junk")

    protocol.begin_checkpoint(tmp_path, 6, "next")
    assert [(s, p.name) for s, p in protocol.complete_checkpoints(tmp_path)] == [(5, "step-00000005")]
    protocol.verify_checkpoint(root / "step-00000005")
    assert (root / "step-00000005" / "payload.txt").read_text() == "old five"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step-00000006-next", "step-00000005"]


def test_moved_aside_copy_is_dropped_when_the_new_checkpoint_took_its_place(tmp_path):
    _complete(tmp_path, 5, "old five")
    root = protocol.checkpoint_root(tmp_path)
    os.rename(root / "step-00000005", root / ".tmp-old-step-00000005-4242")
    _complete(tmp_path, 5, "new five")      # both renames done, killed before the old copy was deleted
    protocol.begin_checkpoint(tmp_path, 6, "next")
    assert (root / "step-00000005" / "payload.txt").read_text() == "new five"
    assert not (root / ".tmp-old-step-00000005-4242").exists()


def test_prune_killed_midway_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2):
        _complete(tmp_path, step, f"step {step}")

    class Killed(BaseException):
        """Stands for a SIGKILL: not an Exception, so no handler in the code under test catches it."""

    def killed_after_first_file(path, ignore_errors=False):
        next(p for p in path.rglob("*") if p.is_file()).unlink()
        raise Killed

    monkeypatch.setattr(protocol.shutil, "rmtree", killed_after_first_file)
    tmp = protocol.begin_checkpoint(tmp_path, 3, "t")
    (tmp / "payload.txt").write_text("step 3")
    with pytest.raises(Killed):
        protocol.complete_checkpoint(tmp, 3, keep=2)
    monkeypatch.undo()
    found = protocol.complete_checkpoints(tmp_path)
    assert [s for s, _ in found] == [2, 3]
    for _, path in found:           # every checkpoint that counts is whole
        protocol.verify_checkpoint(path)
    protocol.begin_checkpoint(tmp_path, 4, "t")
    assert not list(protocol.checkpoint_root(tmp_path).glob(".tmp-prune-*"))


# ------------------------------------------------------------------------------- optional trainer.pt
def test_checkpoint_without_trainer_state_loads_with_trainer_none(tmp_path):
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    ckpt = distributed.write_checkpoint(tmp_path, 1, {"model": dict(weights)}, config_yaml="a: 1\n",
                                        meta={"vocab_size": 3})
    assert not (ckpt / "trainer.pt").exists()
    loaded = load_checkpoint(tmp_path)
    assert loaded["trainer"] is None
    torch.testing.assert_close(loaded["model"]["w"], weights["w"], rtol=0, atol=0)
    assert json.loads((ckpt / "meta.json").read_text())["vocab_size"] == loaded["meta"]["vocab_size"] == 3
