"""Train on this machine: ``python launchers/local.py CONFIG [key.sub=value ...]``.

Runs ``python -m lomdm_dist.train`` in this process (one device). The exit code is the trainer's.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lomdm_dist.train.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
