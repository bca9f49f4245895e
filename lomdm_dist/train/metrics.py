"""One place for run output: console (``print0``), ``metrics.jsonl`` and TensorBoard.

``metrics.jsonl`` has one JSON object a line for scripts, with flat keys exactly as the trainer
produced them; on resume the lines written after the checkpoint being resumed are dropped so that
the file reads as one uninterrupted run.

TensorBoard gets the same numbers under grouped tags (:func:`tensorboard_tag`), so that its
dashboard shows sections (``train/``, ``val/``, ``order/``, ``system/``) instead of one flat list,
and it leaves out series that carry no information as curves: counters that rarely change are
written only when their value changes (:data:`WRITE_ON_CHANGE`), and ``samples_seen`` (a straight
line in the step) is not written at all. The README's TensorBoard table explains each tag.

All console output goes to stderr, through ``tqdm.write`` so that a progress bar on the same
stream is cleared and redrawn around a line instead of being broken by it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ORDER_PREFIXES = ("k_phi", "k_hat", "g_phi", "g_psi", "order_")
"""Keys of the learned generation order (LoMDM's exponents and head outputs): the ``order/`` group.
Routing is by prefix, so diagnostics added to the objective later land there too."""

SYSTEM_KEYS = frozenset({"tokens_per_sec", "tokens_per_sec_per_device", "mfu", "peak_mem_gb", "nonfinite_skipped",
                         "epoch", "samples_seen", "corrupt_shards_skipped"})
SYSTEM_PREFIXES = ("tokens_per_sec", "mfu", "peak_mem", "mem_", "data_", "nonfinite_", "time_")
"""Throughput, memory, data-reader and robustness counters: the ``system/`` group."""

WRITE_ON_CHANGE = frozenset({"epoch", "nonfinite_skipped", "corrupt_shards_skipped", "val_tokens"})
"""Counters and constants: written to TensorBoard at their first value and whenever it changes,
not at every log step (a flat line of zeros hides the series that move)."""

JSONL_ONLY = frozenset({"samples_seen"})
"""Keys kept out of TensorBoard (a linear function of the step); they stay in ``metrics.jsonl``."""


def print0(*args, rank: int | None = None, sep: str = " ", end: str = "\n", file=None) -> None:
    """Print on rank 0 only (RANK from the environment when not given), to stderr by default.

    Written with ``tqdm.write`` so that an active progress bar is cleared first and redrawn
    after the line; without a bar it is a plain write. Flushed, so lines of several processes
    and of the progress bars keep their order.
    """
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        return
    stream = file if file is not None else sys.stderr
    tqdm.write(sep.join(str(a) for a in args), file=stream, end=end)
    stream.flush()


def tensorboard_tag(key: str) -> str:
    """The grouped TensorBoard tag of a flat metrics key.

    ``val_*`` -> ``val/*`` (prefix dropped: ``val_ppl`` -> ``val/ppl``); order diagnostics
    (:data:`ORDER_PREFIXES`) -> ``order/<key>``; throughput, memory, data and non-finite counters
    (:data:`SYSTEM_KEYS`, :data:`SYSTEM_PREFIXES`) -> ``system/<key>``; everything else (loss,
    its parts, lr, grad norm, masking statistics) -> ``train/<key>``.
    """
    if key.startswith("val_"):
        return "val/" + key[len("val_"):]
    if key.startswith(ORDER_PREFIXES):
        return "order/" + key
    if key in SYSTEM_KEYS or key.startswith(SYSTEM_PREFIXES):
        return "system/" + key
    return "train/" + key


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def throughput(tokens: float, seconds: float, num_devices: int, *, flops: float | None = None,
               peak_flops_per_device: float | None = None) -> dict[str, float]:
    """``tokens_per_sec`` (the whole job), ``tokens_per_sec_per_device`` and, when the model FLOPs
    of the window and the devices' peak are known, ``mfu`` (``lomdm_dist.parallel.flops``)."""
    seconds = max(seconds, 1e-9)
    values = {"tokens_per_sec": tokens / seconds, "tokens_per_sec_per_device": tokens / seconds / num_devices}
    if flops is not None and peak_flops_per_device:
        from ..parallel.flops import mfu
        values["mfu"] = mfu(flops, seconds, num_devices, peak_flops_per_device)
    return values


class MetricsLogger:
    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int | None = None, enabled: bool = True,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tensorboard_dir = Path(run_dir) / "tensorboard"
        self.writer = None
        self._last_written: dict[str, float] = {}
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(self.tensorboard_dir),
                                        purge_step=resume_step + 1 if resume_step is not None else None)

    def _truncate_after(self, resume_step: int | None) -> None:
        if not self.path.exists():
            return
        if resume_step is None:
            resume_step = -1
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", -1) <= resume_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a crash
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, values: dict) -> None:
        """One ``metrics.jsonl`` line with the flat keys; the numbers also go to TensorBoard under
        grouped tags (see the module docstring for what is left out there)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is None:
            return
        for key, value in record.items():
            if key == "step" or key in JSONL_ONLY or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key in WRITE_ON_CHANGE and self._last_written.get(key) == value:
                continue
            self._last_written[key] = value
            self.writer.add_scalar(tensorboard_tag(key), value, step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        if self.writer is not None and values.numel():
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def rgb_image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
        """An RGB image (H, W, 3) of uint8, e.g. a figure rendered by ``order_images``."""
        if self.writer is not None and image_hwc.size:
            self.writer.add_image(tag, image_hwc, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
