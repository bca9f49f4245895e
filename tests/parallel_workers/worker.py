"""Multi-process test worker: runs the requested tasks in one process group, writes rank<r>.pt.

usage: worker.py OUT_DIR TASK [TASK ...]
  layout=NAME                      equivalence of a layout with one process (see equivalence.LAYOUTS)
  dropout=LAYOUT                   one step with dropout on (see equivalence.run_dropout)
  checkpoint=IN_CKPT,RUN_DIR       DCP resharding (see checkpointing.run_checkpoint)
  meta=LAYOUT                      a meta-device model materialised in a layout (see meta_init.run_meta)
  layout3d=CKPT_DIR                the 3-D layouts on 8 ranks (see meta_init.run_layout_3d)
One spawn serves many tasks: starting the processes costs more than a toy step.
"""

from __future__ import annotations

import sys
import time

import torch

from parallel_common import finish, init


def main() -> None:
    out_dir, tasks = sys.argv[1], sys.argv[2:]
    rank, world_size = init()
    results: dict = {"timings": {}}
    for task in tasks:
        kind, _, arg = task.partition("=")
        start = time.perf_counter()
        if kind == "layout":
            from equivalence import run_layout
            results[arg] = run_layout(arg, world_size)
        elif kind == "dropout":
            from equivalence import run_dropout
            results[f"dropout-{arg}"] = run_dropout(arg, world_size)
        elif kind == "meta":
            from meta_init import run_meta
            results[f"meta-{arg}"] = run_meta(arg, world_size)
        elif kind == "layout3d":
            from meta_init import run_layout_3d
            results["layout3d"] = run_layout_3d(world_size, arg)
        elif kind == "checkpoint":
            from checkpointing import run_checkpoint
            source, run_dir = arg.split(",")
            results["checkpoint"] = run_checkpoint(source, run_dir, world_size)
        else:
            raise SystemExit(f"unknown task {task!r}")
        results["timings"][task] = time.perf_counter() - start
    # functional collectives started but never waited on (torch warns about them at exit)
    results["pending_collectives"] = torch._C._distributed_c10d._get_work_registry_size()
    finish(out_dir, results)


if __name__ == "__main__":
    main()
