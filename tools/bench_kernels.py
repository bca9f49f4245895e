"""Time the Triton kernels against their PyTorch references, eager and ``torch.compile``d.

    python tools/bench_kernels.py                      # training shapes on CUDA, reduced ones on CPU
    python tools/bench_kernels.py --tokens 4096 --vocab 50258 --dtype bf16 --iters 20

For each kernel and each mode (forward only; forward + backward) it prints the median time, the
bytes the operation must move at the least (logits read once forward; read, read again and
gradient written for forward + backward), the bandwidth that implies, the ratio to that floor at
the device-to-device copy bandwidth measured in the same run, the speed-up over the eager
reference, and the peak memory the call allocates beyond its inputs.

All variants run without the public functions' input checks (which synchronise with the host),
so the numbers compare the computations themselves. On a machine without CUDA only the references
run (Triton kernels need a GPU; the interpreter is for correctness, not speed), and the output
says so.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from kernels import scheduler as sched_mod
from kernels import velocity_loss as loss_mod

GPU_DEFAULTS = {"tokens": 16384, "vocab": 50258, "rows": 32, "seq": 1024, "iters": 20}
CPU_DEFAULTS = {"tokens": 512, "vocab": 50258, "rows": 32, "seq": 1024, "iters": 5}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
C1, C2, K_MIN, N_MASKS = 0.7, 0.65, 1e-4, 2


@dataclass
class Result:
    kernel: str
    mode: str
    variant: str
    ms: float | None
    min_bytes: int
    peak_bytes: int | None
    note: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, help="rows of the loss (masked tokens); default 16384 on GPU, 512 on CPU")
    p.add_argument("--vocab", type=int, help="vocabulary incl. the mask token (default 50258)")
    p.add_argument("--rows", type=int, help="scheduler rows, i.e. sequences (default 32)")
    p.add_argument("--seq", type=int, help="scheduler row length (default 1024)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="logits dtype (default bf16)")
    p.add_argument("--iters", type=int, help="timed iterations per variant (default 20 on GPU, 5 on CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = p.parse_args(argv)
    defaults = GPU_DEFAULTS if torch.cuda.is_available() else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("tokens", "vocab", "rows", "seq", "iters"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.vocab < 2:
        p.error("--vocab must be >= 2 (the last id is the mask token)")
    return args


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], iters: int, device: torch.device, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated during one call (its results included) beyond what existed before.

    CUDA: the caching allocator's peak counter. CPU: replay of the profiler's per-op allocation
    records (an estimate: an op's allocations are placed at its start).
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def copy_bandwidth(nbytes: int, device: torch.device, iters: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted) for an ``nbytes`` buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), max(iters, 3), device)
    return 2 * nbytes / (ms * 1e-3)


# ------------------------------------------------------------------------------------------------
# Workloads
# ------------------------------------------------------------------------------------------------

def _variants(eager: Callable, triton_fn: Callable | None, use_compile: bool
              ) -> list[tuple[str, Callable | None, str]]:
    out: list[tuple[str, Callable | None, str]] = [("eager reference", eager, "")]
    if use_compile:
        out.append(("compiled reference", torch.compile(eager), ""))
    out.append(("triton", triton_fn, "" if triton_fn else "not run: no CUDA device"))
    return out


def bench_velocity_loss(args: argparse.Namespace, device: torch.device, use_compile: bool) -> list[Result]:
    n, v, dtype = args.tokens, args.vocab, DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, v, device=device, dtype=torch.float32, generator=gen).mul_(3).to(dtype)
    mask_id = v - 1
    targets = torch.randint(0, v - 1, (n,), device=device, generator=gen)
    A = torch.rand(n, device=device, generator=gen) * 20 + 0.5
    A_hat = A * torch.exp(0.3 * torch.randn(n, device=device, generator=gen))
    logits_bytes = logits.numel() * logits.element_size()

    def eager(lg, a, ah):
        return loss_mod._reference_rows(lg, targets, a, ah, mask_id, rows=None)  # every row is a loss row

    triton_fn = None
    if device.type == "cuda":
        from kernels._velocity_loss_triton import velocity_loss_triton

        active = torch.ones(n, dtype=torch.uint8, device=device)

        def triton_fn(lg, a, ah):
            return velocity_loss_triton(lg, targets, a, ah, active, mask_id)

    results = []
    for variant, fn, note in _variants(eager, triton_fn, use_compile):
        for mode, floor in (("fwd", logits_bytes), ("fwd+bwd", 3 * logits_bytes)):
            if fn is None:
                results.append(Result("velocity_loss", mode, variant, None, floor, None, note))
                continue
            run = _loss_runner(fn, logits, A, A_hat, mode)
            results.append(_measure("velocity_loss", mode, variant, run, floor, args.iters, device))
    return results


def _loss_runner(fn: Callable, logits: torch.Tensor, A: torch.Tensor, A_hat: torch.Tensor, mode: str) -> Callable:
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(logits, A, A_hat)
        return run
    leaves = [x.detach().requires_grad_() for x in (logits, A, A_hat)]

    def run():
        l_main, l_vel = fn(*leaves)
        return torch.autograd.grad(l_main.sum() + l_vel.sum(), leaves)
    return run


def bench_scheduler(args: argparse.Namespace, device: torch.device, use_compile: bool) -> list[Result]:
    b, L = args.rows, args.seq
    gen = torch.Generator(device=device).manual_seed(1)
    g = torch.randn(b, L, device=device, generator=gen)
    t = torch.rand(b, device=device, generator=gen) * 0.999 + 1e-3
    valid = torch.ones(b, L, dtype=torch.bool, device=device)
    valid[0, L // 2:] = False
    masks = torch.rand(N_MASKS, b, L, device=device, generator=gen) < 0.5
    w_vel = torch.randn(b, L, device=device, generator=gen)
    w_q = torch.randn(N_MASKS, b, device=device, generator=gen)
    io_fwd = 4 * b * L + b * L + N_MASKS * b * L + 3 * 4 * b * L     # g, valid, masks in; k, alpha, velocity out
    io_bwd = 4 * b * L + b * L + N_MASKS * b * L + 4 * b * L + 4 * b * L  # g, valid, masks, dL/dvelocity in; dL/dg

    def eager(gg):
        return sched_mod._reference(gg, t, valid, C1, C2, masks, K_MIN)

    triton_fn = None
    if device.type == "cuda":
        from kernels._scheduler_triton import lomdm_schedule_triton

        valid_u8, masks_u8 = valid.view(torch.uint8), masks.view(torch.uint8)

        def triton_fn(gg):
            return lomdm_schedule_triton(gg, t, valid_u8, masks_u8, C1, C2, K_MIN)

    results = []
    for variant, fn, note in _variants(eager, triton_fn, use_compile):
        for mode, floor in (("fwd", io_fwd), ("fwd+bwd", io_fwd + io_bwd)):
            if fn is None:
                results.append(Result("lomdm_schedule", mode, variant, None, floor, None, note))
                continue
            if mode == "fwd":
                def run(fn=fn):
                    with torch.no_grad():
                        return fn(g)
            else:
                leaf = g.detach().requires_grad_()

                def run(fn=fn, leaf=leaf):  # what training differentiates: velocity (via A) and log q
                    out = fn(leaf)
                    return torch.autograd.grad((out[2] * w_vel).sum() + (out[3] * w_q).sum(), [leaf])
            results.append(_measure("lomdm_schedule", mode, variant, run, floor, args.iters, device))
    return results


def _measure(kernel: str, mode: str, variant: str, run: Callable, floor: int, iters: int,
             device: torch.device) -> Result:
    try:
        ms = time_ms(run, iters, device)
        peak = peak_extra_bytes(run, device)
    except Exception as exc:  # a failed torch.compile must not hide the other rows
        return Result(kernel, mode, variant, None, floor, None, f"failed: {type(exc).__name__}: {exc}"[:120])
    return Result(kernel, mode, variant, ms, floor, peak)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def print_table(results: list[Result], copy_bw: float) -> None:
    eager_ms = {(r.kernel, r.mode): r.ms for r in results if r.variant == "eager reference"}
    header = f"{'kernel':<15} {'mode':<8} {'variant':<19} {'ms':>10} {'min MB':>9} {'GB/s':>8} " \
             f"{'x floor':>8} {'vs eager':>9} {'peak MB':>9}  note"
    print(header)
    print("-" * len(header))
    for r in results:
        if r.ms is None:
            print(f"{r.kernel:<15} {r.mode:<8} {r.variant:<19} {'-':>10} {r.min_bytes / 1e6:>9.1f} {'-':>8} {'-':>8} "
                  f"{'-':>9} {'-':>9}  {r.note}")
            continue
        gbps = r.min_bytes / (r.ms * 1e-3) / 1e9
        floor_ms = r.min_bytes / copy_bw * 1e3
        base = eager_ms.get((r.kernel, r.mode))
        speedup = f"{base / r.ms:.2f}x" if base else "-"
        peak = f"{r.peak_bytes / 1e6:.1f}" if r.peak_bytes is not None else "-"
        print(f"{r.kernel:<15} {r.mode:<8} {r.variant:<19} {r.ms:>10.3f} {r.min_bytes / 1e6:>9.1f} {gbps:>8.1f} "
              f"{r.ms / floor_ms:>8.2f} {speedup:>9} {peak:>9}  {r.note}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"velocity_loss: {args.tokens} tokens x {args.vocab} vocabulary, {args.dtype} logits; "
          f"lomdm_schedule: {args.rows} rows x {args.seq}, {N_MASKS} masks; {args.iters} timed iterations")
    logits_bytes = args.tokens * args.vocab * DTYPES[args.dtype].itemsize
    copy_bw = copy_bandwidth(logits_bytes, device, args.iters)
    print(f"device-to-device copy of {logits_bytes / 1e6:.1f} MB: {copy_bw / 1e9:.1f} GB/s (read + write)")
    use_compile = not args.no_compile
    results = bench_velocity_loss(args, device, use_compile) + bench_scheduler(args, device, use_compile)
    print()
    print_table(results, copy_bw)
    print()
    print("min MB: bytes the operation must move at the least; GB/s = min MB / time; "
          "x floor = time / (min MB at the copy bandwidth).")
    if device.type != "cuda":
        print("Triton kernels were NOT run: no CUDA device. On CPU this tool times only the PyTorch "
              "references (eager and compiled), at reduced default shapes.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
