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


class StepRunner:
    """One model + optimizer + EMA for one scheduler; ``step()`` runs and times a full update."""

    def __init__(self, cfg, scheduler_name: str, batch_rows: int, vocab_size: int, device: torch.device):
        self.diffusion = dataclasses.replace(cfg.diffusion, scheduler=scheduler_name, masks_per_row=0)
        torch.manual_seed(0)
        self.model = build_model(cfg.model, self.diffusion, vocab_size).to(device).train()
        self.scheduler = build_scheduler(self.diffusion)
        self.optimizer = build_optimizer(self.model, cfg.optim, fused=device.type == "cuda")
        self.ema = EMA(self.model, cfg.train.ema_decay)
        self.autocast_dtype = resolve_autocast(cfg.train.precision, device)
        self.clip = cfg.optim.grad_clip or float("inf")
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, vocab_size - 1, (batch_rows, cfg.data.seq_len), generator=generator).to(device)
        self.rows = torch.arange(batch_rows, device=device)
        self.device = device
        self.times: list[float] = []
        self.masked_tokens: list[float] = []
        self.calls = 0

    def step(self, record: bool) -> None:
        _sync(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = diffusion_loss(self.model, self.scheduler, self.x, cfg=self.diffusion, seed=0, step=self.calls,
                                 rows=self.rows, global_batch=len(self.rows))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.ema.update(self.model)
        _sync(self.device)
        self.calls += 1
        if record:
            self.times.append(time.perf_counter() - start)
            masks = self.diffusion.resolved_masks_per_row()
            self.masked_tokens.append(out.stats["masked_fraction"].item() * self.x.numel() * masks)


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
    lomdm = StepRunner(cfg, "lomdm", rows, args.vocab, device)
    mdlm = StepRunner(cfg, "mdlm", 2 * rows, args.vocab, device)
    for i in range(args.warmup + args.iters):  # interleaved, so machine load drifts hit both alike
        lomdm.step(record=i >= args.warmup)
        mdlm.step(record=i >= args.warmup)
    lomdm_s, mdlm_s = statistics.median(lomdm.times), statistics.median(mdlm.times)
    lomdm_masked, mdlm_masked = statistics.mean(lomdm.masked_tokens), statistics.mean(mdlm.masked_tokens)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; model {cfg.model.n_layers}x{cfg.model.d_model}, "
          f"seq {L}, vocab {args.vocab}, precision {resolve_autocast(cfg.train.precision, device) or 'fp32'}")
    print(f"{'step':<28}{'median s':>10}{'rows':>7}{'masked rows':>13}{'masked tok':>12}{'tokens/s':>11}")
    print(f"{'LoMDM (B rows x 2 masks)':<28}{lomdm_s:>10.4f}{rows:>7}{2 * rows:>13}{lomdm_masked:>12.0f}"
          f"{rows * L / lomdm_s:>11.0f}")
    print(f"{'MDLM (2B rows x 1 mask)':<28}{mdlm_s:>10.4f}{2 * rows:>7}{2 * rows:>13}{mdlm_masked:>12.0f}"
          f"{2 * rows * L / mdlm_s:>11.0f}")
    print(f"ratio LoMDM / MDLM step time at equal masked rows: {lomdm_s / mdlm_s:.3f} (ideal ~1.17 + heads; "
          f"LoMDM masks {lomdm_masked / mdlm_masked:.2f}x the tokens at c1 = {cfg.diffusion.c1})")
    print("tokens/s counts clean training tokens: B x L for LoMDM, 2B x L for MDLM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
