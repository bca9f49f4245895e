"""``python -m lomdm_dist.train CONFIG [key.sub=value ...]``: train, evaluate and sample one run.

One process, or one of N started with torchrun's environment (``launchers/local.py --nproc N``,
``torchrun``, the Slurm launcher): every process runs this same command.

Exit codes: 0 finished or stopped cleanly by a signal (checkpoint saved), 2 bad configuration,
layout or input (short message, no traceback), 1 a training error (an unexpected one also prints
its traceback, preceded by a line naming the rank). In a multi-process job a rank that fails
leaves at once (``os._exit`` after flushing its output): its peers then fail in their next
collective, after this rank's report, and no process-group teardown can turn the exit code into
an abort.
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


def load_run_config(config: str, overrides: list[str], world_size: int):
    """The validated config, its layout checked against ``world_size``; None after printing the
    problem as one line ``config error: ...`` on stderr (the caller exits 2)."""
    from ..config import ConfigError, load_config
    from ..parallel.layout import validate_layout

    try:
        cfg = load_config(config, overrides)
        validate_layout(cfg, world_size)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return None
    return cfg


def record_error(err: BaseException) -> None:
    """Write ``{"time", "error"}`` to ``$LOMDM_ERROR_FILE`` when the launcher asked for it."""
    path = os.environ.get(ERROR_FILE_VARIABLE)
    if path:
        with open(path, "w") as f:
            json.dump({"time": time.time(), "error": f"{type(err).__name__}: {err}"}, f)


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
        return 2
    cfg = load_run_config(args.config, args.overrides, env.world_size)
    if cfg is None:
        return 2

    from data_pipeline.errors import DataError

    from .checkpoint import CheckpointError
    from .metrics import print0
    from .trainer import Trainer, TrainingError
    where = f"rank {env.rank}: " if env.world_size > 1 else ""

    def fail(code: int, err: BaseException) -> int:
        record_error(err)
        if env.world_size > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code

    try:
        result = Trainer(cfg, env=env).run()
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
        return fail(1, err)
    summary = f"{result.status} at step {result.step}"
    if result.last_eval:
        summary += f": val_nelbo {result.last_eval['val_nelbo']:.4f}, val_ppl {result.last_eval['val_ppl']:.1f}"
    print0(summary + f"; run directory {cfg.run.dir}", rank=env.rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
