"""Time training steps in a parallel layout: tokens/s per device, MFU, and LoMDM against MDLM.

``python tools/bench_step.py CONFIG [--nproc N] [--iters N] [--warmup N] [--vocab V] [--rows B]
[key.sub=value ...]``, e.g. ``--nproc 2 configs/smoke.yaml parallel.tp=2`` or, on one H100,
``configs/owt-small.yaml parallel.compile=true train.precision=bf16``.

The layout is the config's ``parallel.*`` section; ``--nproc N`` starts N processes through
``launchers/local.py`` (one process needs none). Each step is what the trainer runs in that
layout (``forward_backward``, the global grad clip, AdamW, EMA) on random tokens, so no data is
needed. Reported, from rank 0: the median step time, tokens/s for the job and per device, and MFU
(model FLOPs of all three passes, ``docs/mfu.md``) where the device's bf16 peak is known (GPU).

Equal work on the denoiser: LoMDM trains B rows with two masks each (2B masked rows, plus one
no-grad pass over the B clean rows and the two scheduler heads); MDLM trains 2B rows with one mask
each. The ideal ratio is about 1.17 (one extra forward on B clean rows next to forward + backward on
2B masked rows, at forward : backward = 1 : 2) plus the heads. The two runners alternate step by
step, so drifts in machine load hit both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lomdm_dist.diffusion.schedulers import build_scheduler  # noqa: E402
from lomdm_dist.model import build_model  # noqa: E402
from lomdm_dist.parallel import (ProcessEnv, build_mesh, clip_grad_norm_, forward_backward,  # noqa: E402
                                 init_process_group, local_rows, parallelize_model, process_device,
                                 shutdown_process_group)
from lomdm_dist.parallel.flops import config_step_flops, device_peak_flops, mfu  # noqa: E402
from lomdm_dist.train.__main__ import load_run_config  # noqa: E402
from lomdm_dist.train.ema import EMA  # noqa: E402
from lomdm_dist.train.optimizer import build_optimizer  # noqa: E402
from lomdm_dist.train.trainer import resolve_autocast  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepRunner:
    """One laid-out model + optimizer + EMA for one scheduler; ``step()`` runs and times a full update."""

    def __init__(self, cfg, scheduler_name: str, batch_rows: int, vocab_size: int, device: torch.device, mesh):
        self.cfg = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion, scheduler=scheduler_name,
                                                                          masks_per_row=0))
        self.diffusion = self.cfg.diffusion
        self.autocast_dtype = resolve_autocast(cfg.train.precision, device)
        torch.manual_seed(0)
        model = build_model(cfg.model, self.diffusion, vocab_size)
        param_dtype = self.autocast_dtype if cfg.parallel.dp > 1 else None
        self.pm = parallelize_model(model, mesh, cfg, device=device, param_dtype=param_dtype)
        self.pm.train()
        self.scheduler = build_scheduler(self.diffusion)
        self.optimizer = build_optimizer(self.pm.model, cfg.optim, fused=device.type == "cuda")
        self.ema = EMA(self.pm.model, cfg.train.ema_decay)
        self.clip = cfg.optim.grad_clip or float("inf")
        generator = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, vocab_size - 1, (batch_rows, cfg.data.seq_len), generator=generator)
        self.rows = local_rows(mesh, batch_rows, device=device)
        self.x = tokens[self.rows.cpu()].to(device)
        self.batch_rows, self.vocab_size, self.device = batch_rows, vocab_size, device
        self.times: list[float] = []
        self.masked_fractions: list[float] = []
        self.calls = 0

    def step(self, record: bool) -> None:
        _sync(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = forward_backward(self.pm, self.scheduler, self.x, cfg=self.diffusion, seed=0, step=self.calls,
                                   rows=self.rows, global_batch=self.batch_rows)
        clip_grad_norm_(self.pm.parameters(), self.clip, self.pm.pp_group)
        self.optimizer.step()
        self.ema.update(self.pm.model)
        _sync(self.device)
        self.calls += 1
        if record:
            self.times.append(time.perf_counter() - start)
            self.masked_fractions.append(out.stats["masked_fraction"].item())   # of the global batch

    def report(self, world_size: int, peak: float | None) -> dict[str, float | None]:
        seconds = statistics.median(self.times)
        tokens = self.batch_rows * self.cfg.data.seq_len
        flops = config_step_flops(self.cfg, vocab_size=self.vocab_size, rows=self.batch_rows,
                                  masked_fraction=statistics.mean(self.masked_fractions)).total
        return {"seconds": seconds, "tokens_per_sec": tokens / seconds,
                "tokens_per_sec_per_device": tokens / seconds / world_size, "tflops_per_step": flops / 1e12,
                "mfu": mfu(flops, seconds, world_size, peak) if peak else None,
                "masked_tokens": statistics.mean(self.masked_fractions) * tokens
                * self.diffusion.resolved_masks_per_row()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, the layout included (parallel.tp=2)")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (the layout's world size)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=50258, help="vocabulary size including the mask token")
    parser.add_argument("--rows", type=int, default=0, help="LoMDM rows per step (default: data.batch_size)")
    return parser


def _spawn(argv: list[str], nproc: int) -> int:
    """Run this tool on ``nproc`` ranks through the local launcher (the same arguments, minus --nproc)."""
    from launchers.local import launch

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return launch([sys.executable, str(Path(__file__).resolve()), *rest], nproc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_intermixed_args(argv)
    if args.iters <= 0 or args.warmup < 0 or args.nproc < 1 or args.rows < 0:
        print("error: --iters and --nproc must be positive, --warmup and --rows non-negative", file=sys.stderr)
        return 2
    inside_launch = "RANK" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if inside_launch else args.nproc
    cfg = load_run_config(args.config, args.overrides, world_size)
    if cfg is None:
        return 2
    rows = args.rows or cfg.data.batch_size
    split = cfg.parallel.dp * (cfg.parallel.resolved_microbatches() if cfg.parallel.pp > 1 else 1)
    if rows % split:
        print(f"error: --rows ({rows}) must be divisible by the data-parallel size x microbatches ({split})",
              file=sys.stderr)
        return 2
    if not inside_launch and args.nproc > 1:
        return _spawn(argv, args.nproc)
    return run(cfg, args, rows)


def run(cfg, args: argparse.Namespace, rows: int) -> int:
    env = ProcessEnv.from_environ()
    device = process_device(env, cfg.train.device)
    init_process_group(env, device, timeout_s=cfg.parallel.collective_timeout_s)
    mesh = build_mesh(cfg, env.world_size)
    lomdm = StepRunner(cfg, "lomdm", rows, args.vocab, device, mesh)
    mdlm = StepRunner(cfg, "mdlm", 2 * rows, args.vocab, device, mesh)
    for i in range(args.warmup + args.iters):  # interleaved, so machine load drifts hit both alike
        lomdm.step(record=i >= args.warmup)
        mdlm.step(record=i >= args.warmup)
    precision = resolve_autocast(cfg.train.precision, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = device_peak_flops(name, "bf16" if precision == torch.bfloat16 else None)
    results = lomdm.report(env.world_size, peak), mdlm.report(env.world_size, peak)
    shutdown_process_group(clean=True)
    if env.rank != 0:
        return 0
    par = cfg.parallel.resolved()
    where = name or f"CPU ({torch.get_num_threads()} threads per process)"
    print(f"device: {where} x {env.world_size}; torch {torch.__version__}; layout tp {par.tp} pp {par.pp} "
          f"dp_shard {par.dp_shard} dp_replicate {par.dp_replicate}"
          + (f" microbatches {par.microbatches}" if par.pp > 1 else "")
          + f", sequence_parallel {par.sequence_parallel}, compile {par.compile}, activation checkpointing "
          f"{par.activation_checkpointing}; model {cfg.model.n_layers}x{cfg.model.d_model}, seq {cfg.data.seq_len}, "
          f"vocab {args.vocab}, precision {precision or 'fp32'}")
    print(f"{'step':<26}{'median s':>10}{'rows':>7}{'masked tok':>12}{'tokens/s':>11}{'tok/s/dev':>11}"
          f"{'TFLOP':>8}{'MFU':>8}")
    for label, batch, result in (("LoMDM (B rows x 2 masks)", rows, results[0]),
                                 ("MDLM (2B rows x 1 mask)", 2 * rows, results[1])):
        mfu_text = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a"
        print(f"{label:<26}{result['seconds']:>10.4f}{batch:>7}{result['masked_tokens']:>12.0f}"
              f"{result['tokens_per_sec']:>11.0f}{result['tokens_per_sec_per_device']:>11.0f}"
              f"{result['tflops_per_step']:>8.2f}{mfu_text:>8}")
    print(f"ratio LoMDM / MDLM step time at equal masked rows: {results[0]['seconds'] / results[1]['seconds']:.3f} "
          f"(ideal ~1.17 + heads; LoMDM masks {results[0]['masked_tokens'] / results[1]['masked_tokens']:.2f}x the "
          f"tokens at c1 = {cfg.diffusion.c1})")
    print("tokens/s counts clean training tokens: B x L for LoMDM, 2B x L for MDLM; MFU needs a GPU with a known "
          "bf16 peak (lomdm_dist/parallel/flops.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
