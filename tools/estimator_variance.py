"""Compare the NELBO estimators of a trained model: truncated t ~ U[t_eps, 1] against importance
sampling over the whole interval (0, 1].

    python tools/estimator_variance.py --ckpt runs/smoke --t-samples 4 --max-batches 8

For each time sampling it evaluates the validation split with the checkpoint's weights (EMA by
default) and prints the NELBO per token, its standard error over rows, the standard deviation of
one row's estimate relative to its mean (what a training step sees), and the two parts of the
bound. The truncated number is below the full-interval bound by the share t_eps^k of each
position's loss; the importance-sampled one is unbiased, at the cost in variance shown here.
Writes the table as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="estimator_variance.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory or run directory (its latest checkpoint)")
    parser.add_argument("--t-samples", type=int, default=4, help="time samples per validation row (default 4)")
    parser.add_argument("--max-batches", type=int, default=0, help="validation batches (0: the whole split)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation draws (default 0)")
    parser.add_argument("--out", default="", help="also write the results as JSON to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.t_samples <= 0 or args.max_batches < 0:
        print("estimator_variance.py: --t-samples must be positive and --max-batches >= 0", file=sys.stderr)
        return 2
    from lomdm_dist.eval.perplexity import validation_nelbo
    from lomdm_dist.checkpoint.inference import load_inference_model
    from lomdm_dist.checkpoint.protocol import CheckpointError
    from lomdm_dist.train.data import build_data

    try:
        cfg, model, scheduler = load_inference_model(args.ckpt, use_ema=not args.no_ema)
    except (CheckpointError, FileNotFoundError) as err:
        print(f"estimator_variance.py: {err}", file=sys.stderr)
        return 2
    data = build_data(cfg, dp_rank=0, dp_size=1)
    results = []
    for sampling in ("truncated", "importance"):
        diffusion = dataclasses.replace(cfg.diffusion, time_sampling=sampling)
        batches = list(data.eval_batches(max_batches=args.max_batches))
        out = validation_nelbo(model, scheduler, batches, cfg=diffusion, seed=args.seed, pad_id=data.pad_id,
                               t_samples=args.t_samples, progress=True)
        rows = sum(b.shape[0] for b in batches)
        # The SE is over rows of K time samples each; one row with one sample varies sqrt(rows * K) more.
        single = out["val_nelbo_se"] * (rows * args.t_samples) ** 0.5 / out["val_nelbo"]
        results.append({"time_sampling": sampling, "val_nelbo": out["val_nelbo"], "se": out["val_nelbo_se"],
                        "row_sd_over_mean": single, "l_main": out["val_l_main"],
                        "l_velocity": out["val_l_velocity"], "rows": rows, "t_samples": args.t_samples})
    print(f"{'time sampling':<14}{'NELBO/token':>13}{'SE':>9}{'row sd/mean':>13}{'L_main':>9}{'L_velocity':>12}")
    for r in results:
        print(f"{r['time_sampling']:<14}{r['val_nelbo']:>13.4f}{r['se']:>9.4f}{r['row_sd_over_mean']:>13.3f}"
              f"{r['l_main']:>9.4f}{r['l_velocity']:>12.5f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"ckpt": str(args.ckpt), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
