"""Train on this machine: ``python launchers/local.py [--nproc N] [--grace-s S] [--script PATH] CONFIG
[key.sub=value ...]``.

``--nproc 1`` (the default) runs ``python -m lomdm_dist.train`` in this process; ``--nproc N``
starts N processes of it with torchrun's environment, forwards signals to them and exits with the
first failure's code. ``--script PATH`` runs another Python program the same way (e.g.
``tools/bench_step.py``). The logic and the details live in ``lomdm_dist.launch.local``.
"""

from __future__ import annotations

import sys

from lomdm_dist.launch.local import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
