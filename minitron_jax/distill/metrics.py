"""What a training run records: metrics.jsonl, the console line, throughput and the loss plot.

Only process 0 writes; rows after a resumed checkpoint's step (left by a crash) are dropped so
the file never holds an update twice.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax

from minitron_jax.io import files

from minitron_jax import plots

LOSS_CURVES = ("distill/loss", "distill/kl", "distill/hidden", "distill/ce", "train/ce")


class MetricsLog:
  """metrics.jsonl on process 0; rows after the resumed step (from a crash) are dropped."""

  def __init__(self, path: str, resume_step: int | None):
    self.path = path
    if jax.process_index() != 0:
      return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = read_metrics(path) if os.path.isfile(path) else []
    keep = [r for r in rows if resume_step is not None and r.get("step", 0) <= resume_step]
    files.write_jsonl(path, keep)  # atomic: a kill now loses no row

  def write(self, row: dict) -> None:
    if jax.process_index() == 0:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(path: str) -> list[dict]:
  """The rows of a metrics.jsonl; a last line cut short by a killed process is dropped."""
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i + 1 < len(lines) or line.endswith("\n"):
        raise ValueError(f"{path}: line {i + 1} is not JSON") from None
  return rows


class Meter:
  """Tokens/s since the last report and ETA, over training steps only (not eval or saves)."""

  def __init__(self, steps_left: int):
    self.steps_left = steps_left
    self.total_seconds = 0.0
    self.steps_done = 0
    self._tokens = 0
    self._seconds = 0.0

  def add(self, tokens: int, seconds: float, steps: int = 1) -> None:
    """`steps` updates that trained on `tokens` tokens in `seconds` of wall time."""
    self.steps_left -= steps
    self.total_seconds += seconds
    self._tokens += tokens
    self._seconds += seconds
    self.steps_done += steps

  def report(self) -> tuple[float, float]:
    """(tokens per second since the last report, seconds left at the mean step time)."""
    rate = self._tokens / max(self._seconds, 1e-9)
    eta = self.total_seconds / max(self.steps_done, 1) * self.steps_left
    self._tokens, self._seconds = 0, 0.0
    return rate, eta


def format_row(row: dict, total: int, tok_s: float, eta_s: float) -> str:
  keys = ("distill/loss", "distill/kl", "distill/hidden", "distill/embedding", "distill/ce",
          "train/loss")
  parts = [f"{k.split('/')[1] if k != 'train/loss' else 'loss'} {row[k]:.4f}"
           for k in keys if k in row and not (k == "train/loss" and "distill/loss" in row)]
  eta = time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0))) if math.isfinite(eta_s) else "?"
  return (f"step {row['step']}/{total} | " + " ".join(parts)
          + f" | lr {row['train/lr']:.2e} | {tok_s:,.0f} tok/s | ETA {eta}")


def plot_losses(metrics_path: str, png_path: str) -> None:
  """Loss curves (log scale) and held-out loss from metrics.jsonl."""
  rows = read_metrics(metrics_path)
  curves = [(key, [(r["step"], r[key]) for r in rows if key in r and r[key] > 0], "-", 1.2)
            for key in LOSS_CURVES]
  curves.append(("eval/loss (held out)",
                 [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r], "o--", 1.2))
  plots.line_chart(curves, png_path)
