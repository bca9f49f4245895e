"""Train on this machine: ``python launchers/local.py [--nproc N] CONFIG [key.sub=value ...]``.

The launcher's logic, importable (the tools that spawn themselves on N ranks call :func:`launch`);
``launchers/local.py`` is its command line.

``--nproc 1`` (the default) runs ``python -m lomdm_dist.train`` in this process. ``--nproc N``
starts N processes of it with torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``); the config and its
``parallel.*`` layout are checked here first, so a config error is reported once, before any
process starts (with one process the trainer's own check, in this process, is that check).

While the ranks run, SIGTERM, SIGINT and SIGUSR1 are forwarded to each of them (SIGTERM and SIGUSR1
make the trainer save at the next step boundary and exit 0). The launcher's exit code is the first
non-zero exit code of a rank (128 + N for a rank killed by signal N), or 0: first by the time its
error happened, which each failing trainer records in ``$LOMDM_ERROR_FILE`` (its peers fail too,
moments later, in their next collective), else by the time it ended. When a rank fails the
others get ``--grace-s`` seconds to end by themselves (they usually do: their next collective
fails), then they are killed; SIGTERM would ask a trainer to save a checkpoint, which cannot
succeed with a rank gone. The ranks run in their own session (a Ctrl-C in the terminal reaches
them once, through the launcher) and die with the launcher (Linux ``PR_SET_PDEATHSIG``).

``--script PATH`` runs another Python program the same way (it gets CONFIG and the overrides),
e.g. ``tools/bench_step.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from .supervisor import describe_returncode

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
TRAINER = ("-m", "lomdm_dist.train")
ERROR_FILE_VARIABLE = "LOMDM_ERROR_FILE"   # lomdm_dist.train.__main__ writes it; not imported: no torch here


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the rendezvous of rank 0)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def rank_environment(base: dict[str, str], rank: int, nproc: int, port: int) -> dict[str, str]:
    """torchrun's variables for local rank ``rank`` of ``nproc`` on this machine."""
    threads = base.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    return {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": threads}


def _die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook that makes the child receive SIGKILL when the launcher dies (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util

    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)


def exit_code(returncode: int) -> int:
    """A shell's view of a child's status: 128 + N when it was killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def recorded_errors(folder: Path, nproc: int) -> dict[int, dict]:
    """{rank: {"time", "error"}} of the ranks that recorded their error."""
    found = {}
    for rank in range(nproc):
        try:
            found[rank] = json.loads((folder / f"rank{rank}.json").read_text())
        except (OSError, ValueError):
            continue
    return found


def log(message: str) -> None:
    print(f"[launcher] {message}", file=sys.stderr, flush=True)


def launch(command: Sequence[str], nproc: int, *, grace_s: float = 10.0, poll_s: float = 0.05) -> int:
    """Run ``command`` as ``nproc`` ranks; returns the launcher's exit code (see the module docstring).

    Must be called from the main thread (it installs signal handlers, restored before returning).
    """
    with tempfile.TemporaryDirectory(prefix="lomdm-launch-") as errors:
        return _run(command, nproc, Path(errors), grace_s=grace_s, poll_s=poll_s)


def _run(command: Sequence[str], nproc: int, errors: Path, *, grace_s: float, poll_s: float) -> int:
    port = free_port()
    pre_exec = _die_with_parent()
    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
        received.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    ended: list[int] = []                          # failed ranks in the order they were seen to end
    deadline = None
    try:
        for rank in range(nproc):
            env = rank_environment(dict(os.environ), rank, nproc, port)
            env[ERROR_FILE_VARIABLE] = str(errors / f"rank{rank}.json")
            procs.append(subprocess.Popen(list(command), env=env, start_new_session=True, preexec_fn=pre_exec))
        while any(proc.poll() is None for proc in procs):
            ended += [r for r, p in enumerate(procs) if p.returncode not in (None, 0) and r not in ended]
            if ended and deadline is None:
                deadline = time.monotonic() + grace_s
                log(f"rank {ended[0]} ended with {describe_returncode(procs[ended[0]].returncode)}; the other "
                    f"ranks get {grace_s:g} s to end before they are killed")
            elif deadline is not None and time.monotonic() >= deadline:
                for rank, proc in enumerate(procs):
                    if proc.poll() is None:
                        log(f"killing rank {rank} (pid {proc.pid})")
                        proc.kill()
                deadline = float("inf")
            time.sleep(poll_s)
    finally:
        for proc in procs:
            if proc.poll() is None:      # an exception (or a second interrupt) left the loop early
                proc.kill()
            proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ended += [r for r, p in enumerate(procs) if p.returncode != 0 and r not in ended]
    if not ended:
        if received:
            log(f"all {nproc} ranks ended cleanly after {signal.Signals(received[0]).name}")
        return 0
    recorded = recorded_errors(errors, nproc)
    first = min(recorded, key=lambda r: recorded[r]["time"]) if recorded else ended[0]
    error = f": {recorded[first]['error']}" if first in recorded else ""
    log(f"rank {first} failed first ({describe_returncode(procs[first].returncode)}){error}")
    return exit_code(procs[first].returncode)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launchers/local.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (default 1: in this process)")
    parser.add_argument("--grace-s", type=float, default=10.0,
                        help="seconds the other ranks get to end after one fails, before they are killed")
    parser.add_argument("--script", default=None,
                        help="run this Python program on every rank instead of python -m lomdm_dist.train")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides applied after the file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be positive, got {args.nproc}")
    if args.grace_s < 0:
        parser.error(f"--grace-s must be >= 0, got {args.grace_s}")
    from ..train.__main__ import load_run_config, main as train_main

    if args.nproc == 1 and args.script is None:
        return train_main([args.config, *args.overrides])
    if load_run_config(args.config, args.overrides, args.nproc) is None:
        return 2
    program = [args.script] if args.script is not None else list(TRAINER)
    return launch([sys.executable, *program, args.config, *args.overrides], args.nproc, grace_s=args.grace_s)
