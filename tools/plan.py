"""Capacity plan of a config on a cluster, or a check of the memory prediction against a real step.

    python tools/plan.py CONFIG [--nodes N --gpus-per-node G] [--gpu h100|h200] [--mfu 0.4]
                                [--json FILE] [--vocab-size V] [key.sub=value ...]
    python tools/plan.py --measure CONFIG [--rows R] [key.sub=value ...]

The plan prints parameters, FLOPs per step by pass, memory per GPU (model state, activations,
transients) for the layout in ``parallel.*``, the largest per-GPU batch that fits, and step time
and tokens per day at the given MFU. The cluster's GPU count must equal the layout's world size
(the product of ``parallel.*``); it defaults to the config's ``slurm`` section when that matches,
else to one node with as many GPUs as the layout has ranks. ``--nodes`` alone takes GPUs per node
from ``slurm.gpus_per_node``; ``--gpus-per-node`` alone takes as many nodes as the layout needs. A
cluster that does not match is an error suggesting the ``parallel.dp_replicate=``/``dp_shard=``
override that would.
Exit status: 0 fits, 1 does not fit (the table says by how much), 2 config or usage error.

``--measure`` builds the config's model in one process, runs a training step on ``--rows`` random
rows and prints predicted against measured memory: on CUDA the whole step's peak
(``torch.cuda.max_memory_allocated``), elsewhere the bytes saved for backward. See docs/planning.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lomdm_dist.config import ConfigError, load_config
from lomdm_dist.plan import GPUS, format_plan, make_plan


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tools/plan.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. parallel.tp=8")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: the config's slurm.nodes when it matches the layout)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: slurm.gpus_per_node with --nodes, else what the layout needs)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU kind (memory and bf16 peak)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for step time (default 0.4)")
    p.add_argument("--reserve-gib", type=float, default=None,
                   help="memory per GPU kept free for CUDA context, NCCL and fragmentation (default 6)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary incl. the mask token (default: the tokenizer's + 1)")
    p.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    p.add_argument("--measure", action="store_true",
                   help="build the model, run one step and print predicted against measured memory")
    p.add_argument("--rows", type=int, default=4, help="--measure: rows of the measured step (default 4)")
    return p


def _layout_product(par) -> str:
    return (f"parallel.pp {par.pp} x parallel.dp_replicate {par.dp_replicate} x parallel.dp_shard {par.dp_shard} "
            f"x parallel.tp {par.tp}")


def _matching_overrides(par, gpus: int) -> str:
    """The data-parallel overrides that would give the layout ``gpus`` ranks, as advice."""
    options = []
    for key, others in (("dp_replicate", par.pp * par.dp_shard * par.tp),
                        ("dp_shard", par.pp * par.dp_replicate * par.tp)):
        if gpus % others == 0:
            options.append(f"parallel.{key}={gpus // others}")
    if not options:
        return f"no parallel.dp_replicate= or parallel.dp_shard= value gives {gpus} ranks with this parallel.tp and pp"
    return f"to plan that cluster, override {' or '.join(options)}"


def _cluster(cfg, nodes: int | None, gpus: int | None) -> tuple[int, int]:
    """The cluster to plan: ``nodes`` x ``gpus`` must equal the layout's world size (the product of
    ``parallel.*``), because the planner plans that layout, one rank per GPU.

    Neither flag: the config's ``slurm`` section when it matches the layout, else one node with as
    many GPUs as the layout has ranks. Only ``--nodes``: GPUs per node is ``slurm.gpus_per_node``
    (a property of the machine, not something to stretch to fit). Only ``--gpus-per-node``: as many
    nodes as the layout needs. Anything else is a ``ConfigError`` that names the flag and the
    override that would match the requested cluster.
    """
    for flag, value in (("--nodes", nodes), ("--gpus-per-node", gpus)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value}")
    par = cfg.parallel
    world = par.world_size
    if nodes is None and gpus is None:
        if cfg.slurm.nodes * cfg.slurm.gpus_per_node == world:
            return cfg.slurm.nodes, cfg.slurm.gpus_per_node
        return 1, world
    layout = f"the layout's world size {world} ({_layout_product(par)})"
    if nodes is None:
        if world % gpus:
            raise ConfigError(f"--gpus-per-node ({gpus}) does not divide {layout}; give --nodes as well to be "
                              f"told the parallel.dp_replicate=/dp_shard= override that matches that cluster")
        return world // gpus, gpus
    gpus_source = "--gpus-per-node"
    if gpus is None:
        gpus, gpus_source = cfg.slurm.gpus_per_node, "slurm.gpus_per_node"
    if nodes * gpus != world:
        reason = (f"--nodes ({nodes}) does not divide {layout}" if world % nodes else
                  f"--nodes ({nodes}) x {gpus_source} ({gpus}) = {nodes * gpus} GPUs does not equal {layout}")
        raise ConfigError(f"{reason}; nodes x GPUs per node must equal the world size: "
                          f"{_matching_overrides(par, nodes * gpus)}")
    return nodes, gpus


def _measure(cfg, args) -> int:
    import torch

    from lomdm_dist.parallel.config import ParallelConfig
    from lomdm_dist.plan import activations as act
    from lomdm_dist.plan.memory import GiB
    from lomdm_dist.plan.measure import measure_cuda_peak, measure_saved
    from lomdm_dist.plan.planner import numerics_for, rank_memory, resolve_vocab_size
    from lomdm_dist.plan.params import count_parameters

    vocab = args.vocab_size or resolve_vocab_size(cfg)
    single = ParallelConfig(activation_checkpointing=cfg.parallel.activation_checkpointing)
    params = count_parameters(cfg.model, cfg.diffusion, vocab)
    if torch.cuda.is_available():
        got = measure_cuda_peak(cfg, vocab, args.rows)
        num = numerics_for(cfg, dp=1, device="cuda")
        ranks = rank_memory(cfg, params, rows=args.rows, masked_fraction=got.masked_fraction, num=num, par=single,
                            vocab_size=vocab)
        r = ranks[0]
        predicted_saved = r.activations.total
        print(f"device {torch.cuda.get_device_name()}, {args.rows} rows, masked fraction {got.masked_fraction:.3f}")
        print(f"  saved for backward: predicted {predicted_saved / GiB:.3f} GiB, measured {got.saved_bytes / GiB:.3f} GiB "
              f"({predicted_saved / got.saved_bytes - 1:+.1%})")
        print(f"  step peak:          predicted {r.total / GiB:.3f} GiB, measured {got.peak_bytes / GiB:.3f} GiB "
              f"(max_memory_allocated, {r.total / got.peak_bytes - 1:+.1%})")
        return 0
    num = numerics_for(cfg, dp=1, device="cpu")
    autocast = torch.bfloat16 if num.compute_bytes == 2 else None
    got = measure_saved(cfg, vocab, args.rows, autocast=autocast)
    fraction = float(got.output.stats["masked_fraction"])
    predicted = act.step_saved(rows=args.rows, seq_len=cfg.data.seq_len, num_masks=cfg.diffusion.resolved_masks_per_row(),
                               masked_fraction=fraction, learned=cfg.diffusion.scheduler == "lomdm",
                               s=act.Shape.from_config(cfg, vocab), num=num, ac=cfg.parallel.activation_checkpointing)
    print(f"device cpu, {args.rows} rows, masked fraction {fraction:.3f}")
    print(f"  saved for backward: predicted {predicted.total / GiB:.4f} GiB, measured {got.saved_bytes / GiB:.4f} GiB "
          f"({predicted.total / got.saved_bytes - 1:+.2%}; {got.tensors} storages)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.measure:
            return _measure(cfg, args)
        nodes, gpus = _cluster(cfg, args.nodes, args.gpus_per_node)
        kwargs = {} if args.reserve_gib is None else {"reserve_gib": args.reserve_gib}
        plan = make_plan(cfg, nodes=nodes, gpus_per_node=gpus, gpu=args.gpu, mfu=args.mfu,
                         vocab_size=args.vocab_size, config_name=args.config, **kwargs)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(plan.as_dict(), indent=2) + "\n")
    if not plan.fits:
        over = (plan.memory_bytes - plan.usable_bytes) / 2 ** 30
        print(f"error: the layout does not fit: {plan.peak_rank.role} needs {plan.memory_bytes / 2 ** 30:.1f} GiB, "
              f"{over:.1f} GiB over the {plan.usable_bytes / 2 ** 30:.1f} GiB usable per GPU", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
