"""Time training steps in a parallel layout: tokens/s per device, MFU, peak memory, LoMDM against MDLM.

``python tools/bench_step.py CONFIG [--nproc N] [--iters N] [--warmup N] [--vocab V] [--rows B]
[--split-iters N] [--json FILE] [--profile DIR] [key.sub=value ...]``, e.g. ``--nproc 2
configs/smoke.yaml parallel.tp=2`` or, on one H100, ``configs/owt-small.yaml parallel.compile=true
train.precision=bf16 --rows 32``.

The layout is the config's ``parallel.*`` section; ``--nproc N`` starts N processes through
``launchers/local.py`` (one process needs none). Each step is what the trainer runs in that
layout (``forward_backward``, the global grad clip, AdamW, EMA) on random tokens, so no data is
needed. Reported, from rank 0: the median step time, tokens/s for the job and per device, MFU
(model FLOPs of all three passes, ``docs/mfu.md``) where the device's bf16 peak is known (GPU), and
the peak memory of a step: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU, where no allocator
keeps a peak, the bytes autograd saved for backward during one step (activations, parameter
storage excluded; blocks under activation checkpointing save only their inputs).

Equal work on the denoiser: LoMDM trains B rows with two masks each (2B masked rows, plus one
no-grad pass over the B clean rows and the two scheduler heads); MDLM trains 2B rows with one mask
each. The ideal ratio is about 1.17 (one extra forward on B clean rows next to forward + backward on
2B masked rows, at forward : backward = 1 : 2) plus the heads. The two runners alternate step by
step, so drifts in machine load hit both alike.

The per-pass split (one process, no pipeline) explains the ratio term by term: the pieces of
``lomdm_dist.diffusion.objective`` (randomness and masks, clean pass, phi head, masked passes,
output layer at the masked positions, psi head, token loss) and the optimizer are run one at a
time, forward and backward timed apart (CUDA events on a GPU, ``perf_counter`` after a
synchronisation on CPU), each backward started from a gradient of ones at the piece's output. Each
piece is synchronised on its own, so launch gaps that overlap in the real step are counted here;
"rest" is the full step minus the sum of the pieces (loss assembly, RLOO, and that overlap).

``--profile DIR`` runs a few more steps of each runner under ``torch.profiler``, writes
``DIR/<runner>.trace.json`` (chrome://tracing, Perfetto) and ``DIR/<runner>.top20.txt``, and prints
the 20 operations with the most self time on the device (CPU time on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lomdm_dist.diffusion import objective
from lomdm_dist.diffusion.schedulers import build_scheduler
from lomdm_dist.model import build_model
from lomdm_dist.parallel import (ProcessEnv, build_mesh, clip_grad_norm_, forward_backward,
                                 init_process_group, local_rows, parallelize_model, process_device,
                                 shutdown_process_group)
from lomdm_dist.parallel.flops import config_step_flops, device_peak_flops, mfu
from lomdm_dist.parallel.runtime import resolve_autocast
from lomdm_dist.train.__main__ import load_run_config
from lomdm_dist.train.ema import EMA
from lomdm_dist.train.optimizer import build_optimizer

SPLIT_PARTS = ("randomness + masks", "clean pass (no grad)", "phi head", "masked passes (backbone)",
               "output layer (masked)", "psi head", "token loss", "optimizer (clip, AdamW, EMA)")
"""Rows of the per-pass split, in step order; the heads include turning their output into exponents."""

FLOP_PARTS = {"clean pass (no grad)": "clean_pass", "phi head": "phi_head",
              "masked passes (backbone)": "masked_pass", "output layer (masked)": "output_layer",
              "psi head": "psi_head"}
"""Split rows that have a model-FLOP count (``StepFlops`` fields); the others count none."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds of one call: CUDA events around it on a GPU (device time, host waits excluded),
    ``perf_counter`` after synchronising elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> tuple[object, float]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return result, start.elapsed_time(end) / 1e3
        began = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - began


def _storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages holding a tensor's data: its own, or its inner tensors' for a wrapper subclass
    (DTensor's local shard, a collective's pending result), which has no storage of its own."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        inner = [getattr(tensor, name) for name in names]
        return [storage for t in inner if isinstance(t, torch.Tensor) for storage in _storages(t)]
    return [tensor.untyped_storage()]


def _backward(outputs: list[torch.Tensor]) -> None:
    """Backward from a gradient of ones at each output (timing only: any gradient costs the same)."""
    outputs = [o for o in outputs if o.requires_grad]
    torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])


class StepRunner:
    """One laid-out model + optimizer + EMA for one scheduler; ``step()`` runs and times a full update."""

    def __init__(self, cfg, scheduler_name: str, batch_rows: int, vocab_size: int, device: torch.device, mesh):
        self.name = scheduler_name
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
        self.peak_bytes = 0
        self.step_extra_bytes = 0
        self.saved_bytes: int | None = None
        self.split: dict[str, list[tuple[float, float]]] = {part: [] for part in SPLIT_PARTS}
        self.calls = 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def spec(self) -> objective.StepSpec:
        """The draws of the next step (a fresh t and masks every call, as in training)."""
        return objective.StepSpec(seed=0, step=self.calls, rows=self.rows, global_batch=self.batch_rows)

    def loss_and_grads(self):
        """The trainer's loss-and-backward call (``forward_backward``); with :meth:`spec` the one place
        that names its interface, so a change of that signature is adapted here alone."""
        with self.autocast():
            return forward_backward(self.pm, self.scheduler, self.x, self.spec(), cfg=self.diffusion)

    def update(self) -> None:
        clip_grad_norm_(self.pm.parameters(), self.clip, self.pm.pp_group)
        self.optimizer.step()
        self.ema.update(self.pm.model)

    def step(self, record: bool) -> None:
        cuda = self.device.type == "cuda"
        _sync(self.device)
        if cuda and record:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        base = torch.cuda.memory_allocated(self.device) if cuda else 0   # host-side counter, no sync
        out = self.loss_and_grads()
        self.update()
        _sync(self.device)
        self.calls += 1
        if record:
            self.times.append(time.perf_counter() - start)
            self.masked_fractions.append(out.stats["masked_fraction"].item())   # of the global batch
            if cuda:
                peak = torch.cuda.max_memory_allocated(self.device)
                self.peak_bytes = max(self.peak_bytes, peak)
                self.step_extra_bytes = max(self.step_extra_bytes, peak - base)

    def measure_saved_bytes(self) -> None:
        """CPU: bytes autograd keeps for backward during one (untimed) step, each storage once and
        parameters left out, so it is the activation memory a step adds to the weights and optimizer."""
        params = {storage.data_ptr() for p in self.pm.parameters() for storage in _storages(p)}
        seen: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            for storage in _storages(tensor):
                if storage.data_ptr() not in params and storage.device.type != "meta":
                    seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        self.optimizer.zero_grad(set_to_none=True)
        # Compiled blocks would trace the hook (a recompilation per storage): measure the eager step.
        with torch.compiler.set_stance("force_eager"), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            self.loss_and_grads()
        self.update()
        self.calls += 1
        self.saved_bytes = sum(seen.values())

    def measure_split(self, watch: Stopwatch) -> None:
        """One step taken apart into the objective's pieces, forward and backward timed apart.

        Mirrors ``diffusion_loss`` / ``masked_pass_loss`` piece by piece (same calls, same shapes);
        the returned values are discarded, only the times are kept."""
        model, scheduler, cfg, x = self.pm.model, self.scheduler, self.diffusion, self.x
        backbone = model.backbone
        B, L = x.shape
        K = cfg.resolved_masks_per_row()
        valid = torch.ones_like(x, dtype=torch.bool)
        times_of: dict[str, tuple[float, float]] = {part: (0.0, 0.0) for part in SPLIT_PARTS}
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            spec = self.spec()
            (draw, uniforms), s_rand = watch(lambda: objective.step_randomness(spec, cfg, seq_len=L, num_masks=K,
                                                                               device=x.device))
            t = draw.t.to(torch.float32)
            k_draw = None
            if scheduler.learned:
                def clean_features():       # PlainPasses.clean_pass up to the phi head
                    c_clean = backbone.conditioning(B, objective.conditioning_sigma(backbone, torch.zeros_like(t)))
                    with torch.no_grad():
                        return backbone.features(x, c_clean), c_clean

                (h_clean, c_clean), s_clean = watch(clean_features)
                g_phi, s_phi_f = watch(lambda: model.phi(h_clean, c_clean).float())
                k_draw, s_draw = watch(lambda: objective.draw_exponents(scheduler, g_phi, draw.t, valid))
                s_rand += s_draw
                times_of["clean pass (no grad)"] = (s_clean, 0.0)
            masks, s_masks = watch(lambda: objective.draw_masks(scheduler, draw, uniforms, k_draw))
            z, s_copy = watch(lambda: objective.masked_copies(x, masks, model.mask_token_id))
            times_of["randomness + masks"] = (s_rand + s_masks + s_copy, 0.0)
            if scheduler.learned:
                phi_out, s_exp = watch(lambda: scheduler.exponents(g_phi, draw.t, valid, masks=masks))
                _, s_phi_b = watch(lambda: _backward([phi_out.k, phi_out.log_q]))
                times_of["phi head"] = (s_phi_f + s_exp, s_phi_b)

            def masked_forward():
                c = backbone.conditioning(K * B, objective.conditioning_sigma(backbone, t.repeat(K)))
                return c, backbone.features(z, c)

            (c, h), s_fwd = watch(masked_forward)
            _, s_bwd = watch(lambda: _backward([h, c]))
            times_of["masked passes (backbone)"] = (s_fwd, s_bwd)
            h, c = h.detach().requires_grad_(), c.detach().requires_grad_()
            loss_positions = (masks & valid).reshape(K * B, L)
            row_of_token = loss_positions.nonzero(as_tuple=True)[0]
            logits, s_fwd = watch(lambda: backbone.output_logits(h[loss_positions], c[row_of_token]))
            _, s_bwd = watch(lambda: _backward([logits]))
            times_of["output layer (masked)"] = (s_fwd, s_bwd)
            if scheduler.learned:
                every = torch.ones(K * B, L, dtype=torch.bool, device=x.device)
                psi_k, s_fwd = watch(lambda: scheduler.exponents(model.psi(h, c).float(), draw.t.repeat(K), every).k)
                _, s_bwd = watch(lambda: _backward([psi_k]))
                times_of["psi head"] = (s_fwd, s_bwd)
                velocity = k_draw.float()
                v_hat = psi_k.detach()[loss_positions].requires_grad_()
            else:
                velocity = (scheduler.schedule(draw.t, L).velocity * draw.t[:, None]).float()
            v = velocity.unsqueeze(0).expand(K, B, L).reshape(K * B, L)[loss_positions]
            v = v.detach().requires_grad_(scheduler.learned)
            v_hat = v_hat if scheduler.learned else v
            targets = x.repeat(K, 1)[loss_positions]
            leaf = logits.detach().requires_grad_()
            losses, s_fwd = watch(lambda: self.pm.token_loss(leaf, targets, v, v_hat,
                                                             mask_token_id=model.mask_token_id))
            _, s_bwd = watch(lambda: _backward(list(losses)))
            times_of["token loss"] = (s_fwd, s_bwd)
        _, s_opt = watch(self.update)
        times_of["optimizer (clip, AdamW, EMA)"] = (s_opt, 0.0)
        self.calls += 1
        for part, value in times_of.items():
            self.split[part].append(value)

    def profile(self, steps: int, out_dir: Path, sort_by: str) -> str:
        """``steps`` steps under ``torch.profiler`` after one warm-up step; writes the trace and the
        top-20 table, returns the table."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.step(record=False)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                self.step(record=False)
        prof.export_chrome_trace(str(out_dir / f"{self.name}.trace.json"))
        table = prof.key_averages().table(sort_by=sort_by, row_limit=20)
        (out_dir / f"{self.name}.top20.txt").write_text(table + "\n")
        return table

    def split_medians(self) -> dict[str, tuple[float, float]]:
        return {part: (statistics.median(f for f, _ in values), statistics.median(b for _, b in values))
                for part, values in self.split.items() if values}

    def report(self, world_size: int, peak: float | None) -> dict:
        seconds = statistics.median(self.times)
        tokens = self.batch_rows * self.cfg.data.seq_len
        parts = config_step_flops(self.cfg, vocab_size=self.vocab_size, rows=self.batch_rows,
                                  masked_fraction=statistics.mean(self.masked_fractions))
        flops = parts.total
        result = {"rows": self.batch_rows, "seconds": seconds, "tokens_per_sec": tokens / seconds,
                  "tokens_per_sec_per_device": tokens / seconds / world_size, "tflops_per_step": flops / 1e12,
                  "mfu": mfu(flops, seconds, world_size, peak) if peak else None,
                  "masked_tokens": statistics.mean(self.masked_fractions) * tokens
                  * self.diffusion.resolved_masks_per_row(),
                  "step_seconds_all": list(self.times)}
        if self.device.type == "cuda":
            # The process peak holds both runners' weights and optimizer states; the step's own
            # memory is the peak above what was allocated when it started (after zero_grad).
            result.update(memory_kind="torch.cuda.max_memory_allocated", process_peak_bytes=self.peak_bytes,
                          step_memory_bytes=self.step_extra_bytes)
        elif self.saved_bytes is not None:
            result.update(memory_kind="bytes saved for backward (CPU)", step_memory_bytes=self.saved_bytes)
        split = self.split_medians()
        if split:
            table = {}
            for part, (fwd, bwd) in split.items():
                tflop = getattr(parts, FLOP_PARTS[part]) / 1e12 if part in FLOP_PARTS else 0.0
                total = fwd + bwd
                table[part] = {"fwd_s": fwd, "bwd_s": bwd, "total_s": total, "tflop": tflop,
                               "tflops_per_sec": tflop / total if tflop and total > 0 else None}
            result["split"] = table
            result["split_sum_s"] = sum(v["total_s"] for v in table.values())
            result["split_rest_s"] = seconds - result["split_sum_s"]
        return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, the layout included (parallel.tp=2)")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (the layout's world size)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=50258, help="vocabulary size including the mask token")
    parser.add_argument("--rows", type=int, default=0, help="LoMDM rows per step (default: data.batch_size)")
    parser.add_argument("--split-iters", type=int, default=None,
                        help="runs of the per-pass split per runner (default: --iters; 0: no split). "
                             "One process without pipeline parallelism only")
    parser.add_argument("--json", dest="json_path", default=None, metavar="FILE",
                        help="also write every number as JSON to FILE")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="profile a few steps of each runner: DIR/<runner>.trace.json and .top20.txt")
    parser.add_argument("--profile-steps", type=int, default=2, help="profiled steps per runner (default 2)")
    return parser


def _spawn(argv: list[str], nproc: int) -> int:
    """Run this tool on ``nproc`` ranks through the local launcher (the same arguments, minus --nproc)."""
    from lomdm_dist.launch.local import launch

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
    if args.split_iters is None:
        args.split_iters = args.iters
    if (args.iters <= 0 or args.warmup < 0 or args.nproc < 1 or args.rows < 0 or args.split_iters < 0
            or args.profile_steps < 1):
        print("error: --iters, --nproc and --profile-steps must be positive, --warmup, --rows and --split-iters "
              "non-negative", file=sys.stderr)
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
    for flag, path in (("--json", args.json_path), ("--profile", args.profile)):
        if path is not None and not Path(path).expanduser().resolve().parent.is_dir():
            print(f"error: {flag}: the folder of {path} does not exist", file=sys.stderr)
            return 2
    if not inside_launch and args.nproc > 1:
        return _spawn(argv, args.nproc)
    return run(cfg, args, rows)


def _gib(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _print_split(lomdm: dict, mdlm: dict) -> None:
    """The per-pass table: where the LoMDM step's extra time goes, relative to MDLM at equal masked rows
    ("of extra" is each part's share of the full steps' difference, n/a when LoMDM was not slower)."""
    diff_total = lomdm["seconds"] - mdlm["seconds"]
    print("per-pass split (median ms; each piece synchronised alone): LoMDM B rows x 2 masks, MDLM 2B rows x 1 mask")
    print(f"{'part':<30}{'LoMDM fwd':>10}{'bwd':>9}{'MDLM fwd':>10}{'bwd':>9}{'extra ms':>10}{'of extra':>10}"
          f"{'LoMDM TF/s':>12}")
    for part in SPLIT_PARTS:
        a, b = lomdm["split"][part], mdlm["split"][part]
        extra = a["total_s"] - b["total_s"]
        share = f"{extra / diff_total:.0%}" if diff_total > 0 else "n/a"
        rate = f"{a['tflops_per_sec']:.1f}" if a["tflops_per_sec"] is not None else "-"
        print(f"{part:<30}{a['fwd_s'] * 1e3:>10.2f}{a['bwd_s'] * 1e3:>9.2f}{b['fwd_s'] * 1e3:>10.2f}"
              f"{b['bwd_s'] * 1e3:>9.2f}{extra * 1e3:>10.2f}{share:>10}{rate:>12}")
    for label, key in (("sum of parts", "split_sum_s"), ("full step (median)", "seconds"),
                       ("rest (step - parts)", "split_rest_s")):
        extra = lomdm[key] - mdlm[key]
        share = f"{extra / diff_total:.0%}" if diff_total > 0 else "n/a"
        print(f"{label:<30}{lomdm[key] * 1e3:>19.2f}{mdlm[key] * 1e3:>19.2f}{extra * 1e3:>10.2f}{share:>10}")


def run(cfg, args: argparse.Namespace, rows: int) -> int:
    env = ProcessEnv.from_environ()
    device = process_device(env, cfg.train.device)
    init_process_group(env, device, timeout_s=cfg.parallel.collective_timeout_s)
    mesh = build_mesh(cfg, env.world_size)
    lomdm = StepRunner(cfg, "lomdm", rows, args.vocab, device, mesh)
    mdlm = StepRunner(cfg, "mdlm", 2 * rows, args.vocab, device, mesh)
    runners = (lomdm, mdlm)
    for i in range(args.warmup + args.iters):  # interleaved, so machine load drifts hit both alike
        lomdm.step(record=i >= args.warmup)
        mdlm.step(record=i >= args.warmup)
    can_split = env.world_size == 1 and lomdm.pm.pipeline is None
    if can_split and args.split_iters:
        watch = Stopwatch(device)
        for _ in range(args.split_iters):
            for runner in runners:
                runner.measure_split(watch)
    if device.type != "cuda":
        for runner in runners:
            runner.measure_saved_bytes()
    tables = {}
    if args.profile:
        out_dir = Path(args.profile)
        if env.world_size > 1:
            out_dir = out_dir / f"rank{env.rank}"
        out_dir.mkdir(parents=True, exist_ok=True)
        sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        tables = {runner.name: runner.profile(args.profile_steps, out_dir, sort_by) for runner in runners}
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
          f"{'TFLOP':>8}{'MFU':>8}{'memory':>12}")
    for label, batch, result in (("LoMDM (B rows x 2 masks)", rows, results[0]),
                                 ("MDLM (2B rows x 1 mask)", 2 * rows, results[1])):
        mfu_text = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a"
        print(f"{label:<26}{result['seconds']:>10.4f}{batch:>7}{result['masked_tokens']:>12.0f}"
              f"{result['tokens_per_sec']:>11.0f}{result['tokens_per_sec_per_device']:>11.0f}"
              f"{result['tflops_per_step']:>8.2f}{mfu_text:>8}{_gib(result.get('step_memory_bytes')):>12}")
    ratio = results[0]["seconds"] / results[1]["seconds"]
    print(f"ratio LoMDM / MDLM step time at equal masked rows: {ratio:.3f} "
          f"(ideal ~1.17 + heads; LoMDM masks {results[0]['masked_tokens'] / results[1]['masked_tokens']:.2f}x the "
          f"tokens at c1 = {cfg.diffusion.c1})")
    print("tokens/s counts clean training tokens: B x L for LoMDM, 2B x L for MDLM; MFU needs a GPU with a known "
          "bf16 peak (lomdm_dist/parallel/flops.py)")
    if device.type == "cuda":
        print(f"memory: torch.cuda.max_memory_allocated during a step above what was allocated at its start "
              f"(activations, gradients, temporaries); process peak with both runners' weights and optimizer "
              f"states {_gib(max(r['process_peak_bytes'] for r in results))}")
    elif "memory_kind" in results[0]:
        print("memory (CPU): bytes autograd saved for backward in one step (activations; parameters, gradients "
              "and optimizer state excluded)")
    if "split" in results[0]:
        print()
        _print_split(*results)
    elif args.split_iters:
        print("per-pass split: skipped (one process without pipeline parallelism only)")
    for runner_name, table in tables.items():
        print(f"\nprofile of the {runner_name} step ({args.profile_steps} steps; top 20 by self "
              f"{'device' if device.type == 'cuda' else 'CPU'} time); trace: "
              f"{Path(args.profile) / (runner_name + '.trace.json')}")
        print(table)
    if args.json_path:
        payload = {"device": where, "world_size": env.world_size, "torch": torch.__version__,
                   "layout": dataclasses.asdict(par), "model": dataclasses.asdict(cfg.model),
                   "seq_len": cfg.data.seq_len, "vocab": args.vocab, "precision": str(precision or "fp32"),
                   "iters": args.iters, "warmup": args.warmup, "split_iters": args.split_iters if can_split else 0,
                   "peak_flops_per_device": peak, "ratio": ratio,
                   "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   "lomdm": results[0], "mdlm": results[1]}
        Path(args.json_path).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
