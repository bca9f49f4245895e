"""One place for run output: console (``print0``), ``metrics.jsonl`` and TensorBoard.

``metrics.jsonl`` has one JSON object a line for scripts; on resume the lines written after the
checkpoint being resumed are dropped so that the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch


def print0(*args, rank: int | None = None, **kwargs) -> None:
    """Print on rank 0 only (RANK from the environment when not given)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(*args, **kwargs, file=kwargs.pop("file", sys.stderr), flush=True)


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
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
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

    def log(self, step: int, values: dict, *, prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{prefix}{key}", value, step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        if self.writer is not None and values.numel():
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def image(self, tag: str, image_hw: torch.Tensor, step: int) -> None:
        """A grayscale image (H, W) with values in [0, 1]."""
        if self.writer is not None and image_hw.numel():
            self.writer.add_image(tag, image_hw.detach().float().cpu().clamp(0, 1).unsqueeze(0), step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
