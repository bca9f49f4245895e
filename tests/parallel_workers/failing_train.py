"""``python -m lomdm_dist.train`` with one rank raising mid-run, for the launcher's failure test.

    python tests/parallel_workers/failing_train.py CONFIG [key.sub=value ...]

Environment: ``FAIL_RANK`` (the rank that raises, default 1) and ``FAIL_AT_STEP`` (0-based step
at whose start it raises ``RuntimeError``, default 1). Every other rank trains normally and is
left waiting in its next collective.
"""

from __future__ import annotations

import os
import sys

from lomdm_dist.train.__main__ import main
from lomdm_dist.train.trainer import Trainer

FAIL_RANK = int(os.environ.get("FAIL_RANK", "1"))
FAIL_AT_STEP = int(os.environ.get("FAIL_AT_STEP", "1"))


def install() -> None:
    original = Trainer.train_step

    def train_step(self, x):
        if self.rank == FAIL_RANK and self.step == FAIL_AT_STEP:
            raise RuntimeError(f"injected failure at step {self.step}")
        return original(self, x)

    Trainer.train_step = train_step


if __name__ == "__main__":
    install()
    sys.exit(main(sys.argv[1:]))
