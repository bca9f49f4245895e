"""Run the trainer as a child process and turn the scheduler's stop signal into the trainer's own.

Why a child process rather than calling the trainer in the submitit task: submitit's time-out
handler runs *inside* the task's main thread, between two bytecodes of whatever it interrupted
(possibly half-way through an optimizer step), and ends the process with ``sys.exit``. A
checkpoint written from there would not be a step boundary. With the trainer in a child, the
task process only supervises: a watched signal (the preemption / time-out signal) is recorded
and forwarded as ``SIGUSR1``, which the trainer handles by finishing its step, saving, and exiting
0 (``python -m lomdm_dist.train``'s contract). The caller learns what happened from
:class:`ChildExit` and decides about requeueing in ordinary code.

Details that make this safe:

* The child starts with the watched signals and ``SIGUSR1`` *ignored* (``SIG_IGN`` survives
  ``exec``): Slurm signals every process of a job step, and the trainer only installs its handler
  once its loop starts. A stop request that arrives before then would be lost, so it is re-sent
  every ``resend_s`` seconds until the child exits.
* If the child has not exited ``stop_timeout_s`` seconds after the first request it is killed
  (SIGKILL); the trainer's checkpoints are atomic, so the previous complete one stays usable.
* On Linux the child gets ``PR_SET_PDEATHSIG``: if the supervising task is killed, the trainer
  goes too instead of training on, orphaned, into a run directory a requeued job is using.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

STOP_SIGNAL = signal.SIGUSR1
"""The trainer saves at the next step boundary and exits 0 on this signal (``Trainer.run``)."""

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildExit:
    returncode: int
    """The child's exit status (negative: killed by that signal)."""
    stop_signal: int | None
    """The watched signal that asked for a stop (the first one), or None."""
    killed_after_timeout: bool
    """True when the child did not stop within ``stop_timeout_s`` and was killed."""


def describe_returncode(returncode: int) -> str:
    """``'exit code 1'`` or ``'signal SIGKILL'`` for log messages."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def _parent_death_setter() -> Callable[[], None] | None:
    """A function that makes the calling process receive SIGKILL when its parent dies (Linux only).

    Looked up before ``fork`` so the child only calls into an already-loaded libc.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


class _StopRequests:
    """Signal handler state: which watched signal arrived first (handlers only record)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.first_at: float | None = None

    def __call__(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.signal is None:
            self.signal, self.first_at = signum, time.monotonic()


def run_supervised(command: Sequence[str], *, cwd: str, env: Mapping[str, str], watch: Sequence[int],
                   stop_timeout_s: float, resend_s: float = 5.0, poll_s: float = 0.1,
                   log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True)
                   ) -> ChildExit:
    """Run ``command`` to completion, turning any signal in ``watch`` into stop requests for it.

    Must be called from the main thread (it installs signal handlers, and restores the previous
    ones before returning).
    """
    requests = _StopRequests()
    previous = {sig: signal.signal(sig, requests) for sig in watch}
    ignored_in_child = tuple(set(watch) | {STOP_SIGNAL})
    set_parent_death = _parent_death_setter()

    def prepare_child() -> None:  # runs in the child between fork and exec
        for sig in ignored_in_child:
            signal.signal(sig, signal.SIG_IGN)
        if set_parent_death is not None:
            set_parent_death()

    killed = False
    try:
        proc = subprocess.Popen(list(command), cwd=cwd, env=dict(env), preexec_fn=prepare_child)
        try:
            last_sent: float | None = None
            while proc.poll() is None:
                now = time.monotonic()
                if requests.signal is not None:
                    if last_sent is None:
                        log(f"received {signal.Signals(requests.signal).name}: asking the trainer (pid {proc.pid}) "
                            f"to save at the next step boundary and exit")
                    if last_sent is None or now - last_sent >= resend_s:
                        proc.send_signal(STOP_SIGNAL)
                        last_sent = now
                    if not killed and now - requests.first_at >= stop_timeout_s:
                        log(f"the trainer did not stop within {stop_timeout_s:.0f} s; killing it (the previous "
                            f"complete checkpoint stays valid)")
                        proc.kill()
                        killed = True
                time.sleep(poll_s)
        finally:
            if proc.poll() is None:  # an exception (KeyboardInterrupt, SystemExit) left the loop early
                proc.kill()
                proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return ChildExit(returncode=proc.returncode, stop_signal=requests.signal, killed_after_timeout=killed)
