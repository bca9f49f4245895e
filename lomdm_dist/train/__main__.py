"""``python -m lomdm_dist.train CONFIG [key.sub=value ...]``: train, evaluate and sample one run.

Exit codes: 0 finished or stopped cleanly by a signal (checkpoint saved), 2 bad configuration or
input (short message, no traceback), 1 a training error.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lomdm_dist.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config file (configs/smoke.yaml, configs/owt-small.yaml, ...)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides applied after the file")
    args = parser.parse_args(argv)

    from ..config import ConfigError, load_config
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    from data_pipeline.errors import DataError

    from .checkpoint import CheckpointError
    from .metrics import print0
    from .trainer import Trainer, TrainingError
    try:
        trainer = Trainer(cfg)
        result = trainer.run()
    except (DataError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return 1
    summary = f"{result.status} at step {result.step}"
    if result.last_eval:
        summary += f": val_nelbo {result.last_eval['val_nelbo']:.4f}, val_ppl {result.last_eval['val_ppl']:.1f}"
    print0(summary + f"; run directory {cfg.run.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
