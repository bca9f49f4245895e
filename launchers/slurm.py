"""Submit training to Slurm: ``python launchers/slurm.py [--nodes N] [--gpus-per-node 8] [--partition P]
[--account A] [--qos Q] [--time MIN] [--constraint C] [--exclusive] [--job-name NAME] [--dry-run]
[--local] CONFIG [key.sub=value ...]``.

One task per GPU through ``submitit``; the job saves and requeues itself on time-out or preemption
and resumes from the newest complete checkpoint in ``run.dir``. ``--dry-run`` prints the resolved
job as JSON (executor parameters, world size, commands, environment, parallel layout) and submits
and writes nothing: the config file the tasks train from is written at submission. Settings
without a flag (``slurm.env``, ``slurm.setup``, ``slurm.mem_gb``, ...) come from the config's
``slurm:`` section or ``slurm.KEY=VALUE`` overrides; ``--help`` lists them. The logic lives in
``lomdm_dist.launch``.
"""

from __future__ import annotations

import sys

from lomdm_dist.launch.submit import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
