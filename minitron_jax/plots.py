"""Line charts written as PNG files (loss curves), with matplotlib's file-only backend."""

from __future__ import annotations

from typing import Sequence

# (label, [(x, y), ...], matplotlib format string, line width)
Curve = tuple[str, Sequence[tuple[float, float]], str, float]


def pyplot():
  """`matplotlib.pyplot` on the file-only Agg backend, so no display is ever needed; imported
  on first use, because only the stages that draw need matplotlib."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def line_chart(curves: Sequence[Curve], png_path: str, *, xlabel: str = "step",
               ylabel: str = "loss", log_y: bool = True, legend_size: float | None = None
               ) -> bool:
  """Draws the non-empty curves into `png_path`; returns False (writing nothing) if none is."""
  curves = [c for c in curves if c[1]]
  if not curves:
    return False
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for label, points, fmt, width in curves:
    ax.plot(*zip(*points), fmt, label=label, lw=width, ms=3)
  if log_y:
    ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=legend_size)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)
  return True
