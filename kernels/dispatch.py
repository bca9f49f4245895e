"""Backend choice shared by every kernel module, and the output allocator the kernels write into.

Each public kernel function takes ``backend="auto" | "torch" | "triton"``. ``auto`` runs the Triton
kernel on CUDA tensors and the PyTorch reference everywhere else, so the same model code trains on
a laptop and on an H100. Triton is imported lazily: a machine without it still gets the reference.

Outputs of the Triton kernels are allocated through :func:`empty_output`. Inside
:func:`poison_outputs` that allocator fills them with NaN, so a test sees any element a kernel
forgot to write (``torch.empty`` would hand back whatever bytes were lying there, often zeros).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Literal

import torch

Backend = Literal["torch", "triton"]
_BACKENDS = ("auto", "torch", "triton")

_poison_outputs = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Within this block, kernel output buffers start as NaN instead of uninitialised memory."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, enabled
    try:
        yield
    finally:
        _poison_outputs = previous


def empty_output(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer the kernel fully overwrites (NaN-filled under :func:`poison_outputs`)."""
    if _poison_outputs:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """None when ``triton`` imports, else the reason it does not (cached: import once)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_is_interpreted() -> bool:
    """Whether ``@triton.jit`` builds interpreter functions in this process.

    Triton decides this when a kernel is decorated, from ``TRITON_INTERPRET``; the environment at
    call time does not matter any more, so the check reads Triton's own setting.
    """
    if triton_import_error() is not None:
        return False
    try:
        from triton import knobs
    except ImportError:  # Triton releases before knobs read the variable directly
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
    return bool(knobs.runtime.interpret)


def resolve_backend(backend: str, *tensors: torch.Tensor, kernel: str) -> Backend:
    """Turn the user's ``backend`` argument into the implementation to run.

    ``kernel`` names the calling function in error messages.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"{kernel}: backend must be one of {_BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and triton_import_error() is None else "torch"
    # backend == "triton": forced, so every obstacle is an error rather than a silent fallback.
    error = triton_import_error()
    if error is not None:
        raise RuntimeError(f"{kernel}: backend='triton' was requested but triton does not import ({error})")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{kernel}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if not on_cuda and not triton_is_interpreted():
        raise RuntimeError(
            f"{kernel}: backend='triton' on {next(iter(devices))} tensors runs only under the Triton "
            "interpreter: set TRITON_INTERPRET=1 in the environment before triton and kernels.* are "
            f"first imported (it is {os.environ.get('TRITON_INTERPRET')!r} now), or use backend='torch'"
        )
    return "triton"


@contextlib.contextmanager
def quiet_interpreter(device: torch.device) -> Iterator[None]:
    """Silence numpy's floating-point warnings while the Triton interpreter runs a kernel.

    Branch-free kernel code evaluates both sides of a ``tl.where`` (log(0), 0/0 in the side that
    is thrown away); on a GPU that is free and silent, under the interpreter numpy warns about it.
    """
    if device.type == "cuda" or not triton_is_interpreted():
        yield
        return
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        yield


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1); Triton block shapes must be powers of two."""
    return 1 << max(0, (int(n) - 1).bit_length())
