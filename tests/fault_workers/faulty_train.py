"""``python -m lomdm_dist.train`` with faults injected at chosen points, for the fault-tolerance tests.

    python tests/fault_workers/faulty_train.py [fault options] -- CONFIG [key.sub=value ...]

Everything after ``--`` goes to the real CLI (``lomdm_dist.train.__main__.main``) unchanged; the
options patch the trainer from the outside:

--record FILE             append ``step <rank> <step> <sha256 of the batch> <pid>`` for every step
                          started, and ``start <rank> <pid>`` when the process starts (the samples consumed)
--kill-at-step K          SIGKILL this process inside the forward pass of step K (0-based), i.e. mid-step
--kill-in-save S:N        SIGKILL while writing the checkpoint of step S, right after its N-th file
                          was written and fsynced (N = number of files + 1: after the COMPLETE marker,
                          before the rename)
--kill-after-rename S     SIGKILL after the checkpoint of step S was renamed into place, before pruning
--signal-parent-at-step K send the submitit preemption signal to the parent process (the submitit
                          task) during step K, as Slurm's ``--signal`` does
--nan-at-steps K,K,...    make the loss NaN at these steps
--inf-from-step K         make the loss +inf at every step from K on
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
from pathlib import Path

from lomdm_dist.checkpoint import protocol as ckpt_lib
from lomdm_dist.train.__main__ import main
from lomdm_dist.train.trainer import Trainer


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _append_line(path: str, line: str) -> None:
    """One ``write`` on an O_APPEND descriptor: a SIGKILL leaves whole lines only."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(args: argparse.Namespace) -> None:
    original_train_step = Trainer.train_step
    original_compute_loss = Trainer.compute_loss

    def train_step(self, x):
        if args.record:
            digest = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            _append_line(args.record, f"step {self.rank} {self.step} {digest} {os.getpid()}")
        return original_train_step(self, x)

    nan_steps = {int(s) for s in args.nan_at_steps.split(",") if s} if args.nan_at_steps else set()

    def compute_loss(self, x):
        out = original_compute_loss(self, x)
        if self.step == args.kill_at_step:
            _die()
        if self.step == args.signal_parent_at_step:
            from lomdm_dist.launch.job import preemption_signal
            os.kill(os.getppid(), preemption_signal())
        if self.step in nan_steps:
            out.loss = out.loss * float("nan")
        if args.inf_from_step is not None and self.step >= args.inf_from_step:
            out.loss = out.loss * float("inf")
        return out

    Trainer.train_step = train_step
    Trainer.compute_loss = compute_loss

    if args.kill_in_save:
        save_step, after_files = (int(v) for v in args.kill_in_save.split(":"))
        original_fsync = ckpt_lib._fsync_file
        calls = {"n": 0}

        def fsync_file(path: Path) -> None:
            original_fsync(path)
            if Path(path).parent.name.startswith(f".tmp-{ckpt_lib.step_dir_name(save_step)}-"):
                calls["n"] += 1
                if calls["n"] == after_files:
                    _die()

        ckpt_lib._fsync_file = fsync_file

    if args.kill_after_rename is not None:
        original_fsync_dir = ckpt_lib._fsync_dir

        def fsync_dir(path: Path) -> None:
            original_fsync_dir(path)
            if (Path(path) / ckpt_lib.step_dir_name(args.kill_after_rename) / ckpt_lib.MARKER).is_file():
                _die()

        ckpt_lib._fsync_dir = fsync_dir


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: faulty_train.py [options] -- CONFIG [overrides]")
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--record")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-in-save")
    parser.add_argument("--kill-after-rename", type=int)
    parser.add_argument("--signal-parent-at-step", type=int)
    parser.add_argument("--nan-at-steps", default="")
    parser.add_argument("--inf-from-step", type=int)
    return parser.parse_args(argv[:split]), argv[split + 1:]


if __name__ == "__main__":
    options, rest = parse(sys.argv[1:])
    if options.record:
        _append_line(options.record, f"start {_rank()} {os.getpid()}")
    install(options)
    sys.exit(main(rest))
