"""Time a LoMDM training step against an MDLM step on the same model, in one run.

``python tools/bench_step.py CONFIG [--iters N] [--warmup N] [key.sub=value ...]``

Equal work on the denoiser: LoMDM trains B rows with two masks each (2B masked rows, plus one
no-grad pass over the B clean rows and the two scheduler heads); MDLM trains 2B rows with one mask
each. The ideal ratio is about 1.17 (one extra forward on B clean rows next to forward + backward on
2B masked rows, at forward : backward = 1 : 2) plus the heads. Random tokens are used, so no data is
needed; timings include backward, grad clipping, AdamW and EMA.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lomdm_dist.config import ConfigError, load_config  # noqa: E402
from lomdm_dist.diffusion.objective import diffusion_loss  # noqa: E402
from lomdm_dist.diffusion.schedulers import build_scheduler  # noqa: E402
from lomdm_dist.model import build_model  # noqa: E402
from lomdm_dist.train.ema import EMA  # noqa: E402
from lomdm_dist.train.optimizer import build_optimizer  # noqa: E402
from lomdm_dist.train.trainer import resolve_autocast, resolve_device  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(cfg, scheduler_name: str, batch_rows: int, vocab_size: int, iters: int, warmup: int,
               device: torch.device) -> list[float]:
    diffusion = dataclasses.replace(cfg.diffusion, scheduler=scheduler_name, masks_per_row=0)
    torch.manual_seed(0)
    model = build_model(cfg.model, diffusion, vocab_size).to(device)
    model.train()
    scheduler = build_scheduler(diffusion)
    optimizer = build_optimizer(model, cfg.optim, fused=device.type == "cuda")
    ema = EMA(model, cfg.train.ema_decay)
    autocast_dtype = resolve_autocast(cfg.train.precision, device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab_size - 1, (batch_rows, cfg.data.seq_len), generator=generator).to(device)
    rows = torch.arange(batch_rows, device=device)
    times = []
    for step in range(warmup + iters):
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = diffusion_loss(model, scheduler, x, cfg=diffusion, seed=0, step=step, rows=rows,
                                 global_batch=batch_rows)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        ema.update(model)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=50258, help="vocabulary size including the mask token")
    parser.add_argument("--rows", type=int, default=0, help="LoMDM rows per step (default: data.batch_size)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.iters <= 0 or args.warmup < 0:
        print("error: --iters must be positive and --warmup non-negative", file=sys.stderr)
        return 2
    device = resolve_device(cfg.train.device)
    rows = args.rows or cfg.data.batch_size
    L = cfg.data.seq_len
    lomdm = time_steps(cfg, "lomdm", rows, args.vocab, args.iters, args.warmup, device)
    mdlm = time_steps(cfg, "mdlm", 2 * rows, args.vocab, args.iters, args.warmup, device)
    lomdm_s, mdlm_s = statistics.median(lomdm), statistics.median(mdlm)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; model {cfg.model.n_layers}x{cfg.model.d_model}, "
          f"seq {L}, vocab {args.vocab}, precision {resolve_autocast(cfg.train.precision, device) or 'fp32'}")
    print(f"{'step':<28}{'median s':>10}{'rows':>8}{'masked rows':>13}{'tokens/s':>12}")
    print(f"{'LoMDM (B rows x 2 masks)':<28}{lomdm_s:>10.4f}{rows:>8}{2 * rows:>13}{rows * L / lomdm_s:>12.0f}")
    print(f"{'MDLM (2B rows x 1 mask)':<28}{mdlm_s:>10.4f}{2 * rows:>8}{2 * rows:>13}{2 * rows * L / mdlm_s:>12.0f}")
    print(f"ratio LoMDM / MDLM step time at equal masked rows: {lomdm_s / mdlm_s:.3f} (ideal ~1.17 + heads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
