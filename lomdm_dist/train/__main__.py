"""``python -m lomdm_dist.train CONFIG [key.sub=value ...]``: train, evaluate and sample one run.

One process, or one of N started with torchrun's environment (``launchers/local.py --nproc N``,
the Slurm launcher, or torchrun itself): every process runs this same command, e.g.
``torchrun --nproc_per_node 8 -m lomdm_dist.train configs/owt-small.yaml parallel.dp_shard=8``
(``--nnodes`` / ``--rdzv-endpoint`` for several machines). Under ``torchrun --max-restarts N`` a
restarted group resumes from the newest complete checkpoint in ``run.dir`` like any other run.

Exit codes: 0 finished or stopped cleanly by a signal (checkpoint saved), 2 bad configuration,
layout or input (short message, no traceback), 1 a training error (an unexpected one also prints
its traceback, preceded by a line naming the rank). In a multi-process job a rank that fails
leaves at once (``os._exit`` after flushing its output): its peers then fail in their next
collective, after this rank's report, and no process-group teardown can turn the exit code into
an abort. A configuration error is the same on every rank, so only rank 0 prints it. Each
failing rank records its error for the launcher: in ``$LOMDM_ERROR_FILE`` (``launchers/local.py``)
and in ``$TORCHELASTIC_ERROR_FILE``, whose message torchrun's failure summary shows (torchrun
itself exits 1 whatever its ranks' codes were).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

ERROR_FILE_VARIABLE = "LOMDM_ERROR_FILE"
"""Where a failing rank records its error and when (JSON), for a launcher to name the first failure."""
TORCHRUN_ERROR_FILE_VARIABLE = "TORCHELASTIC_ERROR_FILE"
"""torchrun's equivalent; its failure summary prints the message written there."""


def load_run_config(config: str, overrides: list[str], world_size: int, *, rank: int = 0):
    """The validated config, its layout checked against ``world_size``; None after printing the
    problem as one line ``config error: ...`` on stderr (the caller exits 2). Ranks other than 0
    only record the error (every rank reads the same config: one report is enough)."""
    from ..config import ConfigError, load_config
    from ..parallel.layout import validate_layout

    try:
        cfg = load_config(config, overrides)
        validate_layout(cfg, world_size)
    except ConfigError as err:
        if rank == 0:
            print(f"config error: {err}", file=sys.stderr)
        if world_size > 1:
            record_error(err)
        return None
    return cfg


def record_error(err: BaseException, details: str | None = None) -> None:
    """Write ``{"time", "error"}`` to ``$LOMDM_ERROR_FILE`` and torchrun's error record (the layout
    of torch's ``ErrorHandler.record_exception``) to ``$TORCHELASTIC_ERROR_FILE``, for whichever
    launcher asked. ``details`` (a traceback) replaces the one-line message in torchrun's summary.
    Written here rather than through ``ErrorHandler`` so that a config error need not import torch."""
    message = f"{type(err).__name__}: {err}"
    now = time.time()
    path = os.environ.get(ERROR_FILE_VARIABLE)
    if path:
        with open(path, "w") as f:
            json.dump({"time": now, "error": message}, f)
    path = os.environ.get(TORCHRUN_ERROR_FILE_VARIABLE)
    if path:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": details or message,
                                                                      "timestamp": str(int(now))}}}, f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lomdm_dist.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config file (configs/smoke.yaml, configs/owt-small.yaml, ...)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides applied after the file")
    args = parser.parse_args(argv)

    from ..config import ConfigError
    from ..parallel.runtime import ProcessEnv
    try:
        env = ProcessEnv.from_environ()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        record_error(err)
        return 2
    cfg = load_run_config(args.config, args.overrides, env.world_size, rank=env.rank)
    if cfg is None:
        return 2

    from data_pipeline.errors import DataError

    from ..checkpoint.protocol import CheckpointError
    from ..parallel.layout import parallel_section
    from .metrics import print0
    from .trainer import Trainer, TrainingError
    where = f"rank {env.rank}: " if env.world_size > 1 else ""

    def fail(code: int, err: BaseException, details: str | None = None) -> int:
        record_error(err, details)
        if env.world_size > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code

    try:
        result = Trainer(cfg, env=env, parallel=parallel_section(cfg)).run()   # layout checked above
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as err:
        print(f"{where}error: {err}", file=sys.stderr)
        return fail(2, err)
    except TrainingError as err:
        print(f"{where}training stopped: {err}", file=sys.stderr)
        return fail(1, err)
    except Exception as err:
        if env.world_size == 1:
            raise
        traceback.print_exc()
        print(f"rank {env.rank} of {env.world_size} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return fail(1, err, traceback.format_exc())
    summary = f"{result.status} at step {result.step}"
    if result.last_eval:
        summary += f": val_nelbo {result.last_eval['val_nelbo']:.4f}, val_ppl {result.last_eval['val_ppl']:.1f}"
    print0(summary + f"; run directory {cfg.run.dir}", rank=env.rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
