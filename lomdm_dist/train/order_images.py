"""Readable TensorBoard pictures of the learned generation order.

A model's order diagnostics are small matrices: the exponents ``k_phi`` of a few validation rows
(rows x positions) and the reverse step at which each position of a sample was unmasked
(samples x positions). Logged as raw grey pixels they are strips a few pixels high with no scale.
Here each is drawn as a heat map with a colour bar, axis labels and a title that says what the
colours mean, and returned as an RGB array (H, W, 3) of uint8 for ``SummaryWriter.add_image``.

matplotlib draws on its Agg canvas through the object-oriented API (no pyplot, so no global
backend switch, no display and no figure left open in the training process). Where it is not installed (e.g. a
GPU machine with a minimal environment) the matrices are still logged, as grey images with each
cell scaled up to a block of pixels, and a note says once what is missing.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

CELL_PIXELS = 8
"""Side of one matrix cell in the fallback (no matplotlib) picture."""

_warned = False


def _matplotlib():
    """matplotlib, or None (after a one-time note) when it is not installed."""
    global _warned
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401  (imports the Agg canvas)
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        if not _warned:
            print("order images: matplotlib is not installed; logging plain grey images "
                  "(pip install 'matplotlib>=3.8' for labelled heat maps)", file=sys.stderr)
            _warned = True
        return None
    return matplotlib


def _grey_blocks(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """values (R, L) -> (R * CELL_PIXELS, L * CELL_PIXELS, 3) uint8, low -> black, high -> white."""
    span = high - low if high > low else 1.0
    grey = np.clip((values - low) / span, 0.0, 1.0)
    grey = np.nan_to_num(grey, nan=0.0)
    pixels = (grey * 255).round().astype(np.uint8)
    pixels = np.repeat(np.repeat(pixels, CELL_PIXELS, axis=0), CELL_PIXELS, axis=1)
    return np.repeat(pixels[:, :, None], 3, axis=2)


def heatmap(values, *, low: float, high: float, title: str, colorbar_label: str, row_label: str,
            cmap: str = "viridis", masked=None) -> np.ndarray:
    """A labelled heat map of ``values`` (R, L) with the colour scale fixed to [low, high], as RGB uint8.

    A fixed scale (not the data's own min and max) keeps images of different steps comparable.
    ``masked`` (R, L) bool marks cells to leave blank (padding).
    """
    values = torch.as_tensor(values).detach().float().cpu().numpy()
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"heatmap: expected a non-empty (rows, positions) matrix, got shape {values.shape}")
    if masked is not None:
        values = np.where(torch.as_tensor(masked).cpu().numpy(), np.nan, values)
    mpl = _matplotlib()
    if mpl is None:
        return _grey_blocks(values, low, high)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, length = values.shape
    width = min(max(6.0, 2.0 + length * 0.09), 16.0)
    height = min(max(2.2, 1.3 + rows * 0.28), 8.0)
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = mpl.colormaps[cmap].with_extremes(bad="white")
    shown = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=colours, vmin=low, vmax=high,
                      extent=(-0.5, length - 0.5, rows - 0.5, -0.5))
    ax.set_xlabel("position")
    ax.set_ylabel(row_label)
    ax.set_title(title, fontsize=9)
    if rows <= 16:
        ax.set_yticks(range(rows))
    bar = fig.colorbar(shown, ax=ax, pad=0.01)
    bar.set_label(colorbar_label, fontsize=9)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def priority_image(k_phi, valid, *, c1: float, c2: float) -> np.ndarray:
    """The exponents k_phi (R, L) of validation rows, scaled to their possible range [c1 - c2, c1 + c2].

    A position is still masked at time t with probability t^k, so a large k is unmasked early in
    generation (bright) and a small k late (dark); padding is blank.
    """
    low, high = (c1 - c2, c1 + c2) if c2 > 0 else (c1 - 0.5, c1 + 0.5)
    padding = ~torch.as_tensor(valid).bool()
    title = "generation priority k_phi per position: bright = generated early, dark = late"
    if bool(padding.any()):
        title += ", blank = padding"
    shown = torch.as_tensor(k_phi).detach().float().cpu()[~padding.cpu()]
    if shown.numel():   # the scale is fixed for comparability; say how much of it these rows use
        title += f"\n(these rows: {shown.min().item():.3f} to {shown.max().item():.3f})"
    return heatmap(k_phi, low=low, high=high, masked=padding, row_label="validation row", title=title,
                   colorbar_label=f"k_phi (range {low:.2f} to {high:.2f})")


def generation_order_image(order, steps: int) -> np.ndarray:
    """The reverse step at which each position of each sample was unmasked (R, L), 0 .. steps.

    Dark = unmasked in the first steps, bright = last; ``steps`` itself marks positions that the
    final argmax filled after the last step.
    """
    return heatmap(order, low=0.0, high=float(max(steps, 1)), cmap="magma", row_label="sample",
                   title=f"generation order: reverse step at which each position was unmasked "
                         f"(dark = early, bright = late, {steps} = final fill)",
                   colorbar_label="reverse step")
