"""Train several variants of one config on the same data and compare them in one table and a few plots.

    python tools/compare.py configs/smoke.yaml \\
        --runs lomdm: mdlm:diffusion.scheduler=mdlm poly:diffusion.scheduler=poly lomdm-c2zero:diffusion.c2=0 \\
        --protocol equal-work --out runs/compare train.max_steps=600

An ablation is only as fair as its budget, so the budget is chosen by a named protocol rather than by
hand: ``paper`` gives every run the same ``data.batch_size`` and ``train.max_steps`` (the paper's
setting); ``equal-work`` gives every run the same number of masked rows per step. LoMDM draws two
masks per row (its RLOO estimator), fixed schedulers one, so under ``equal-work`` a run with fewer
masks per row trains on a proportionally larger batch (MDLM at 2B beside LoMDM at B).

Each run is ``python -m lomdm_dist.train CONFIG <common overrides> <run overrides> run.dir=OUT/runs/NAME``,
started one after another as a subprocess with its output in ``OUT/runs/NAME.log``. The trainer resumes
from a checkpoint in its ``run.dir``, so running the same command again after an interruption continues
where it stopped. Then, from each run's ``metrics.jsonl``, it writes into OUT:

- ``summary.md``: one table row per run (final validation NELBO and its parts, throughput, train wall
  time, learned-exponent spread, the command);
- ``summary.json``: the same numbers and the full curves;
- ``val_nelbo_vs_step.png``, ``val_nelbo_vs_time.png``, ``k_phi_spread_vs_step.png`` (LoMDM runs);
- ``tensorboard/NAME/``: the curves under tags ``compare/val_nelbo`` and ``compare/k_phi_std``, so that
  ``tensorboard --logdir OUT/tensorboard`` overlays the runs in one chart.

The trainer does not log wall time; the "train wall time (evaluation excluded)" here is rebuilt from
the logged throughput: the sum over train lines of ``batch * seq_len * steps since the previous line
/ tokens_per_sec``. The trainer restarts its throughput window after each evaluation, so this counts
training (and checkpoint saving) but not evaluation, and stays comparable between runs that evaluate
at different rates or on different validation sets.

``--skip-train`` only re-renders the outputs from the runs already in OUT. Bad arguments exit with
status 2 and one line; a run that fails stops the comparison with status 1, naming the run and its log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROTOCOLS = ("paper", "equal-work")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
PROTOCOL_KEYS = ("data.batch_size", "train.max_steps")
"""Keys the protocol decides: a run may not set them itself, or the comparison would not be the protocol's."""
WALL_TIME_LABEL = "train wall time (evaluation excluded)"
PLOTS = ("val_nelbo_vs_step.png", "val_nelbo_vs_time.png", "k_phi_spread_vs_step.png")


class UsageError(ValueError):
    """A bad command line: reported as one line, exit status 2."""


class RunFailed(RuntimeError):
    """A training subprocess failed: reported naming the run and its log, exit status 1."""


# ------------------------------------------------------------------------------------------ arguments
@dataclass
class RunSpec:
    name: str
    overrides: list[str]


@dataclass
class PlannedRun:
    """One run as it will be (or was) trained: its own overrides plus what the protocol added."""
    name: str
    overrides: list[str]
    scheduler: str
    masks_per_row: int
    batch_size: int
    max_steps: int
    seq_len: int
    warmup_steps: int
    run_dir: Path
    argv: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        """The command as a person would type it (``python`` rather than this interpreter's path)."""
        return shlex.join(["python", *self.argv[1:]])

    @property
    def log_path(self) -> Path:
        return self.run_dir.parent / f"{self.name}.log"


def split_overrides(text: str) -> list[str]:
    """``'a=1,b=[2, 3]'`` -> ``['a=1', 'b=[2, 3]']``: commas split overrides except inside brackets,
    so that list values such as ``optim.betas=[0.9,0.98]`` survive."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth = max(depth - 1, 0)
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_run_specs(items: list[str]) -> list[RunSpec]:
    """``['lomdm:', 'mdlm:diffusion.scheduler=mdlm']`` -> run specs; raises UsageError on a spec
    without ``NAME:``, a name unusable as a folder, a duplicate name or an override without ``=``."""
    specs, seen = [], set()
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep:
            raise UsageError(f"--runs: '{item}' must look like NAME:key=value,key=value (NAME: alone for the "
                             f"config as is); overrides for every run go after the other flags")
        if not NAME_PATTERN.fullmatch(name):
            raise UsageError(f"--runs: run name '{name}' in '{item}' must be letters, digits and _ . + - "
                             f"(it names the run's folder)")
        if name in seen:
            raise UsageError(f"--runs: duplicate run name '{name}'")
        seen.add(name)
        overrides = split_overrides(rest)
        for override in overrides:
            key, eq, _ = override.partition("=")
            if not eq or not key.strip():
                raise UsageError(f"--runs: override '{override}' of run '{name}' must look like key.sub=value")
            key = key.strip()
            if key == "run.dir":
                raise UsageError(f"--runs: run '{name}' sets run.dir; compare.py puts each run in OUT/runs/NAME")
            if key in PROTOCOL_KEYS:
                raise UsageError(f"--runs: run '{name}' sets {key}, which the protocol decides; set it for "
                                 f"every run after the other flags")
        specs.append(RunSpec(name, overrides))
    if not specs:
        raise UsageError("--runs: give at least one NAME:overrides")
    return specs


def equal_work_batches(base_batch: int, masks_per_row: dict[str, int]) -> dict[str, int]:
    """Batch per run so that ``batch * masks_per_row`` is the same for every run.

    The runs with the most masks per row keep ``base_batch``; the others are multiplied up (never
    cut down, so no run trains on fewer rows than the config asks for). Raises UsageError when a
    batch would not be a whole number of rows."""
    most = max(masks_per_row.values())
    work = base_batch * most
    batches = {}
    for name, masks in masks_per_row.items():
        if work % masks:
            raise UsageError(f"--protocol equal-work: {work} masked rows per step ({base_batch} x {most}) is not "
                             f"a multiple of the {masks} masks per row of run '{name}'; choose data.batch_size "
                             f"so that it is")
        batches[name] = work // masks
    return batches


def plan_runs(config: str, specs: list[RunSpec], protocol: str, common: list[str], out: Path) -> list[PlannedRun]:
    """Resolve each run's config (``load_config``) to learn its scheduler, masks per row and
    budget, apply the protocol, and build the trainer command. Config errors raise UsageError
    naming the run."""
    from lomdm_dist.config import ConfigError, load_config

    if protocol not in PROTOCOLS:
        raise UsageError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got '{protocol}'")
    for override in common:
        key, eq, _ = override.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"override '{override}' must look like key.sub=value")
        if key.strip() == "run.dir":
            raise UsageError("run.dir cannot be set for every run; compare.py puts each run in OUT/runs/NAME")

    def resolve(name: str, overrides: list[str]):
        try:
            return load_config(config, overrides)
        except ConfigError as err:
            raise UsageError(f"run '{name}': config error: {err}") from None

    resolved = {spec.name: resolve(spec.name, [*common, *spec.overrides]) for spec in specs}
    masks = {name: cfg.diffusion.resolved_masks_per_row() for name, cfg in resolved.items()}
    if protocol == "equal-work":
        base = next(iter(resolved.values())).data.batch_size      # the same for all: runs cannot set it
        batches = equal_work_batches(base, masks)
    else:
        batches = {name: cfg.data.batch_size for name, cfg in resolved.items()}

    runs = []
    for spec in specs:
        protocol_overrides = []
        if batches[spec.name] != resolved[spec.name].data.batch_size:
            protocol_overrides.append(f"data.batch_size={batches[spec.name]}")
        run_dir = out / "runs" / spec.name
        overrides = [*common, *spec.overrides, *protocol_overrides, f"run.dir={run_dir}"]
        cfg = resolve(spec.name, overrides)                       # the batch change must validate too
        runs.append(PlannedRun(
            name=spec.name, overrides=spec.overrides, scheduler=cfg.diffusion.scheduler,
            masks_per_row=masks[spec.name], batch_size=cfg.data.batch_size, max_steps=cfg.train.max_steps,
            seq_len=cfg.data.seq_len, warmup_steps=cfg.optim.warmup_steps, run_dir=run_dir,
            argv=[sys.executable, "-m", "lomdm_dist.train", config, *overrides]))
    return runs


# ------------------------------------------------------------------------------------------ training
def train_runs(runs: list[PlannedRun]) -> None:
    """Train each run in turn (resuming any checkpoint in its run.dir); stop at the first failure."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    for i, run in enumerate(runs, 1):
        run.run_dir.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{i}/{len(runs)}] {run.name}: {run.command}", flush=True)
        print(f"      log: {run.log_path}", flush=True)
        start = time.perf_counter()
        with run.log_path.open("a") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {run.command}\n")
            log.flush()
            code = subprocess.run(run.argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            tail = run.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            detail = "".join(f"\n    {line}" for line in tail)
            raise RunFailed(f"run '{run.name}' failed with exit status {code}; log: {run.log_path}{detail}")
        print(f"      done in {time.perf_counter() - start:.1f} s", flush=True)


# ------------------------------------------------------------------------------------------ metrics
def _number(value) -> float | None:
    """A finite float, or None (missing, or the trainer's string for NaN/Inf)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train lines, eval lines) of a ``metrics.jsonl``, each sorted by step; a line cut off by a
    crash is skipped."""
    train, evals = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "step" not in record:
            continue
        if "val_nelbo" in record:
            evals.append(record)
        elif "loss" in record:
            train.append(record)
    return sorted(train, key=lambda r: r["step"]), sorted(evals, key=lambda r: r["step"])


def train_wall_time(train: list[dict], batch_size: int, seq_len: int) -> list[tuple[int, float]]:
    """Cumulative train wall time (evaluation excluded) at each train line: ``(step, seconds)``.

    A line's ``tokens_per_sec`` is the throughput of the window since the previous line (evaluation
    resets the window, so it is not counted), hence the interval took ``batch * seq_len * steps /
    tokens_per_sec``. A line without a usable throughput is skipped: the next usable one covers its
    steps at its own rate."""
    points, total, previous = [], 0.0, 0
    for record in train:
        rate = _number(record.get("tokens_per_sec"))
        if rate is None or rate <= 0:
            continue
        step = int(record["step"])
        total += batch_size * seq_len * (step - previous) / rate
        previous = step
        points.append((step, total))
    return points


def time_at_step(points: list[tuple[int, float]], step: int) -> float | None:
    """Train wall time at ``step``, interpolated between train lines (extrapolated at the last
    rate beyond them); None without any point."""
    if not points:
        return None
    anchors = [(0, 0.0), *points]
    for (s0, t0), (s1, t1) in zip(anchors, anchors[1:]):
        if step <= s1:
            return t0 + (t1 - t0) * (step - s0) / (s1 - s0) if s1 > s0 else t1
    (s0, t0), (s1, t1) = anchors[-2], anchors[-1]
    return t1 + (t1 - t0) / (s1 - s0) * (step - s1) if s1 > s0 else t1


def summarize_run(run: PlannedRun, train: list[dict], evals: list[dict]) -> dict:
    """The table's numbers and the curves of one run (None where a value is not available)."""
    wall = train_wall_time(train, run.batch_size, run.seq_len)
    last_eval = evals[-1] if evals else {}
    spreads = [(int(r["step"]), _number(r.get("k_phi_std"))) for r in train if "k_phi_std" in r]
    after_warmup = [v for s, v in spreads if s > run.warmup_steps and v is not None]
    rates = [v for v in (_number(r.get("tokens_per_sec")) for r in train) if v is not None]
    train_keys = ("loss", "nelbo", "l_main", "l_velocity", "tokens_per_sec", "k_phi_std")
    eval_keys = ("val_nelbo", "val_nelbo_se", "val_ppl", "val_l_main", "val_l_velocity")
    return {
        "name": run.name, "scheduler": run.scheduler, "masks_per_row": run.masks_per_row,
        "batch_size": run.batch_size, "masked_rows_per_step": run.batch_size * run.masks_per_row,
        "max_steps": run.max_steps, "steps": int(train[-1]["step"]) if train else 0,
        "warmup_steps": run.warmup_steps,
        "final_val_nelbo": _number(last_eval.get("val_nelbo")),
        "final_val_nelbo_se": _number(last_eval.get("val_nelbo_se")),
        "final_val_ppl": _number(last_eval.get("val_ppl")),
        "final_val_l_main": _number(last_eval.get("val_l_main")),
        "final_val_l_velocity": _number(last_eval.get("val_l_velocity")),
        "median_tokens_per_sec": statistics.median(rates) if rates else None,
        "train_wall_time_s": wall[-1][1] if wall else None,
        "k_phi_std_final": spreads[-1][1] if spreads else None,
        "k_phi_std_min_after_warmup": min(after_warmup) if after_warmup else None,
        "command": run.command, "run_dir": str(run.run_dir), "log": str(run.log_path),
        "curves": {
            "train": {"step": [int(r["step"]) for r in train],
                      **{k: [_number(r.get(k)) for r in train] for k in train_keys},
                      "train_wall_time_s": [time_at_step(wall, int(r["step"])) for r in train]},
            "eval": {"step": [int(r["step"]) for r in evals],
                     **{k: [_number(r.get(k)) for r in evals] for k in eval_keys},
                     "train_wall_time_s": [time_at_step(wall, int(r["step"])) for r in evals]},
        },
    }


# ------------------------------------------------------------------------------------------ rendering
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_loss(value: float | None) -> str:
    """Four decimals, or scientific notation for a term so small that they would read as zero
    (LoMDM's velocity term early in training)."""
    if value is None:
        return "-"
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.2f} h"


def markdown_summary(summaries: list[dict], *, config: str, protocol: str, common: list[str]) -> str:
    """``summary.md``: what was compared and how, then one row per run."""
    if protocol == "equal-work":
        work = sorted({s["masked_rows_per_step"] for s in summaries})
        budget = (f"equal-work: batch x masks per row = {', '.join(map(str, work))} masked rows per step "
                  f"for every run")
    else:
        budget = "paper: the same data.batch_size and train.max_steps for every run"
    header = ["run", "scheduler", "masks/row", "batch", "steps", "final val NELBO ± SE", "val L_main",
              "val L_velocity", "tokens/s (median)", WALL_TIME_LABEL, "k_phi spread final",
              "k_phi spread min after warm-up", "command"]
    rows = []
    for s in summaries:
        nelbo = "-" if s["final_val_nelbo"] is None else \
            f"{s['final_val_nelbo']:.4f} ± {_fmt(s['final_val_nelbo_se'], '.4f')}"
        rows.append([s["name"], s["scheduler"], str(s["masks_per_row"]), str(s["batch_size"]),
                     f"{s['steps']} / {s['max_steps']}", nelbo, format_loss(s["final_val_l_main"]),
                     format_loss(s["final_val_l_velocity"]), _fmt(s["median_tokens_per_sec"], ".0f"),
                     format_duration(s["train_wall_time_s"]), _fmt(s["k_phi_std_final"], ".3g"),
                     _fmt(s["k_phi_std_min_after_warmup"], ".3g"),
                     "`" + s["command"].replace("|", "\\|") + "`"])
    lines = [
        "# Comparison", "",
        f"Config `{config}`" + (f" with `{shlex.join(common)}`" if common else "") + f"; protocol {budget}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "NELBO in nats per token (validation, final evaluation; SE '-' when the run did not log it). "
        f"{WALL_TIME_LABEL[0].upper() + WALL_TIME_LABEL[1:]}: rebuilt from the logged throughput as the sum "
        "of batch x seq_len x steps / tokens_per_sec over train lines. k_phi spread: standard deviation of "
        "the learned exponents (LoMDM only); its minimum counts train lines after optim.warmup_steps.",
        "",
    ]
    return "\n".join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_val_nelbo(summaries: list[dict], path: Path, *, x: str, protocol: str) -> None:
    """Validation NELBO of every run against the step (``x='step'``) or the train wall time
    (``x='train_wall_time_s'``), with a band of one standard error where the runs logged it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for s in summaries:
        curve = s["curves"]["eval"]
        points = [(a, v, se) for a, v, se in zip(curve[x], curve["val_nelbo"], curve["val_nelbo_se"])
                  if a is not None and v is not None]
        if not points:
            continue
        xs, ys, ses = zip(*points)
        line, = ax.plot(xs, ys, marker="o", markersize=3, label=f"{s['name']} (batch {s['batch_size']})")
        if all(se is not None for se in ses):
            ax.fill_between(xs, [y - e for y, e in zip(ys, ses)], [y + e for y, e in zip(ys, ses)],
                            color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training step" if x == "step" else f"{WALL_TIME_LABEL} [s]")
    ax.set_ylabel("validation NELBO [nats / token]")
    what = "step" if x == "step" else "train wall time"
    ax.set_title(f"Validation NELBO vs {what} (protocol {protocol})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_k_phi_spread(summaries: list[dict], path: Path) -> bool:
    """Spread of the learned exponents per step for the runs that log it, on a log scale so that a
    spread collapsing towards zero (the learned order degenerating to a fixed schedule) stays
    visible; exact zeros are drawn on a floor line. False (nothing written) without such a run."""
    curves = []
    for s in summaries:
        c = s["curves"]["train"]
        pts = [(step, v) for step, v in zip(c["step"], c["k_phi_std"]) if v is not None]
        if pts:
            curves.append((s, pts))
    if not curves:
        return False
    positive = [v for _, pts in curves for _, v in pts if v > 0]
    floor = min(positive) / 10 if positive else 1e-6
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for s, pts in curves:
        steps, values = zip(*pts)
        ax.plot(steps, [max(v, floor) for v in values], marker="o", markersize=3, label=s["name"])
    ax.axhline(floor, color="gray", linestyle="--", linewidth=1, label=f"zero (drawn at {floor:.2g})")
    warmups = {s["warmup_steps"] for s, _ in curves}
    if len(warmups) == 1 and 0 < next(iter(warmups)) < max(st for _, pts in curves for st, _ in pts):
        ax.axvline(next(iter(warmups)), color="gray", linestyle=":", linewidth=1, label="end of warm-up")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor / 1.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("k_phi spread (std of learned exponents)")
    ax.set_title("Spread of the learned exponents k_phi vs step (LoMDM runs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_tensorboard(summaries: list[dict], root: Path) -> None:
    """One sub-folder per run with the same tags, so TensorBoard overlays the runs in one chart.
    Each run's folder is rewritten from scratch: re-rendering never duplicates points."""
    from torch.utils.tensorboard import SummaryWriter

    for s in summaries:
        folder = root / s["name"]
        if folder.exists():
            shutil.rmtree(folder)
        writer = SummaryWriter(log_dir=str(folder))
        try:
            ev = s["curves"]["eval"]
            for step, value in zip(ev["step"], ev["val_nelbo"]):
                if value is not None:
                    writer.add_scalar("compare/val_nelbo", value, step)
            tr = s["curves"]["train"]
            for step, value in zip(tr["step"], tr["k_phi_std"]):
                if value is not None:
                    writer.add_scalar("compare/k_phi_std", value, step)
        finally:
            writer.close()


def render(runs: list[PlannedRun], out: Path, *, config: str, protocol: str, common: list[str]) -> list[dict]:
    """Read every run's metrics and write summary.md, summary.json, the plots and TensorBoard."""
    summaries = []
    for run in runs:
        metrics = run.run_dir / "metrics.jsonl"
        if not metrics.is_file():
            raise UsageError(f"run '{run.name}': no metrics at {metrics} (train it: run without --skip-train)")
        saved = run.run_dir / "config.yaml"
        if saved.is_file():   # what the run actually used wins over what this command line plans
            from lomdm_dist.config import ConfigError, load_config
            try:
                cfg = load_config(saved)
            except ConfigError as err:
                raise UsageError(f"run '{run.name}': cannot read {saved}: {err}") from None
            if (cfg.data.batch_size, cfg.data.seq_len) != (run.batch_size, run.seq_len):
                print(f"warning: run '{run.name}' was trained with batch {cfg.data.batch_size} x seq_len "
                      f"{cfg.data.seq_len}, not the {run.batch_size} x {run.seq_len} this command plans; "
                      f"reporting what it used", file=sys.stderr)
                run.batch_size, run.seq_len = cfg.data.batch_size, cfg.data.seq_len
        summaries.append(summarize_run(run, *read_metrics(metrics)))

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(markdown_summary(summaries, config=config, protocol=protocol, common=common))
    (out / "summary.json").write_text(json.dumps({
        "config": config, "protocol": protocol, "common_overrides": common,
        "train_wall_time_note": f"{WALL_TIME_LABEL}: sum over train lines of batch_size * seq_len * "
                                f"(steps since previous line) / tokens_per_sec",
        "runs": summaries}, indent=1))
    plot_val_nelbo(summaries, out / "val_nelbo_vs_step.png", x="step", protocol=protocol)
    plot_val_nelbo(summaries, out / "val_nelbo_vs_time.png", x="train_wall_time_s", protocol=protocol)
    if not plot_k_phi_spread(summaries, out / "k_phi_spread_vs_step.png"):
        (out / "k_phi_spread_vs_step.png").unlink(missing_ok=True)       # no stale plot from an earlier set
        print("no run logs k_phi_std (no LoMDM run): k_phi_spread_vs_step.png not written", file=sys.stderr)
    write_tensorboard(summaries, out / "tensorboard")
    return summaries


# ------------------------------------------------------------------------------------------ main
class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage block is what ``--help`` is for)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="compare.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="example: python tools/compare.py configs/smoke.yaml --runs lomdm: "
                                   "mdlm:diffusion.scheduler=mdlm --protocol equal-work --out runs/compare "
                                   "train.max_steps=600")
    parser.add_argument("config", help="YAML config shared by every run (configs/smoke.yaml, ...)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="overrides for every run, applied before each run's own (put them after the other flags)")
    parser.add_argument("--runs", nargs="+", required=True, metavar="NAME:OVERRIDES",
                        help="one or more runs, each NAME:key=value,key=value (NAME: alone is the config as is); "
                             "NAME names the folder OUT/runs/NAME")
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS,
                        help="paper: the same data.batch_size and train.max_steps for every run; equal-work: the "
                             "same masked rows per step (batch x masks per row), multiplying the batch of runs "
                             "that draw fewer masks per row")
    parser.add_argument("--out", required=True, help="output folder: runs/, their logs, summary.md, summary.json, "
                                                      "plots, tensorboard/")
    parser.add_argument("--skip-train", action="store_true",
                        help="do not train; re-render the outputs from the runs already in OUT/runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    out = Path(args.out)
    try:
        specs = parse_run_specs(args.runs)
        runs = plan_runs(args.config, specs, args.protocol, args.overrides, out)
        if not args.skip_train:
            train_runs(runs)
        summaries = render(runs, out, config=args.config, protocol=args.protocol, common=args.overrides)
    except UsageError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 1
    print((out / "summary.md").read_text())
    written = ["summary.md", "summary.json", *(p for p in PLOTS if (out / p).is_file()), "tensorboard/"]
    print(f"wrote {', '.join(str(out / w) for w in written)} ({len(summaries)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
