"""A PNG of the generation order of samples: for each sample, the reverse step at which each position
was unmasked, as a heat map, with given (clamped) positions in a colour of their own.

A sample is one row of positions; a 1 x 1,024 strip is unreadable, so each sample's positions are
wrapped row by row into a near-square grid (position = row * width + column) and drawn as its own
panel. All panels share one colour scale, 0 .. steps (``steps`` = filled by the final argmax after
the last step), so panels compare directly. matplotlib draws through its object-oriented API (no
pyplot: no global backend, no figure left open).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

GIVEN_COLOUR = "#35b8e0"
"""Given (clamped) positions: a cyan outside the magma scale of the unmasking steps."""


def grid_width(seq_len: int) -> int:
    """Positions per panel row: the whole row up to 64 positions, else about sqrt(L), a multiple of 8."""
    if seq_len <= 64:
        return seq_len
    return 8 * math.ceil(math.sqrt(seq_len) / 8)


def _wrap(values: np.ndarray, width: int) -> np.ndarray:
    """(L,) -> (ceil(L / width), width) float, cells past the end NaN."""
    rows = -(-values.size // width)
    out = np.full(rows * width, np.nan)
    out[:values.size] = values
    return out.reshape(rows, width)


def write_order_png(path: str | os.PathLike, order, steps: int, given=None, *, max_samples: int = 8,
                    title: str | None = None) -> int:
    """Draw the first ``max_samples`` rows of ``order`` (N, L) (given positions marked by ``given`` (N, L)
    bool, or by negative order values) into the PNG ``path``; returns the number of panels drawn."""
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise RuntimeError("the order PNG needs matplotlib (pip install 'matplotlib>=3.8')") from None
    order = torch.as_tensor(order).detach().cpu().numpy()
    if order.ndim != 2 or order.size == 0:
        raise ValueError(f"write_order_png: expected a non-empty (samples, positions) matrix, got shape {order.shape}")
    given = (order < 0) if given is None else torch.as_tensor(given).detach().cpu().numpy().astype(bool)
    n = min(order.shape[0], max_samples)
    seq_len = order.shape[1]
    width = grid_width(seq_len)
    rows = -(-seq_len // width)
    cols = min(n, 4)
    panel_rows = -(-n // cols)
    panel_w = min(max(3.0, 0.12 * width + 0.8), 6.0)
    panel_h = min(max(0.8, 0.12 * rows + 0.8), 6.0)
    fig = Figure(figsize=(max(cols * panel_w + 1.2, 6.0), max(panel_rows * panel_h + 1.0, 2.4)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    steps_cmap = colormaps["magma"].with_extremes(bad="white")
    given_cmap = ListedColormap([GIVEN_COLOUR]).with_extremes(bad=(0, 0, 0, 0))
    shown = None
    for i in range(n):
        ax = fig.add_subplot(panel_rows, cols, i + 1)
        steps_grid = _wrap(np.where(given[i], np.nan, order[i].astype(float)), width)
        given_grid = _wrap(np.where(given[i], 1.0, np.nan), width)
        extent = (-0.5, width - 0.5, rows - 0.5, -0.5)
        shown = ax.imshow(steps_grid, cmap=steps_cmap, vmin=0, vmax=max(steps, 1), interpolation="nearest",
                          aspect="auto", extent=extent)
        if bool(given[i].any()):
            ax.imshow(given_grid, cmap=given_cmap, vmin=0, vmax=1, interpolation="nearest", aspect="auto",
                      extent=extent)
        ax.set_title(f"sample {i}", fontsize=8)
        ax.set_xlabel(f"position mod {width}" if rows > 1 else "position", fontsize=7)
        if rows > 1:
            ax.set_ylabel(f"position // {width}", fontsize=7)
        else:
            ax.set_yticks([])
        ax.tick_params(labelsize=6)
    bar = fig.colorbar(shown, ax=fig.axes, pad=0.01)
    bar.set_label("reverse step", fontsize=8)
    if bool(given[:n].any()):
        fig.legend(handles=[Patch(color=GIVEN_COLOUR, label="given (clamped)")], loc="outside lower right",
                   fontsize=8)
    more = f" (first {n} of {order.shape[0]})" if n < order.shape[0] else ""
    fig.suptitle((title or f"generation order: reverse step at which each position was unmasked\n(dark = early, "
                           f"bright = late, {steps} = final argmax)") + more, fontsize=9)
    fig.savefig(path, format="png")
    return n
