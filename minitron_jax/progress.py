"""One progress line for long loops: done/total, rate and ETA on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
  """Reports `label: done/total unit (rate/s, ETA s)` at most every `every` seconds, and once
  more when done reaches total. Call it (or `update`) with the count done so far."""

  def __init__(self, label: str, total: int, unit: str = "items", enabled: bool = True,
               every: float = 2.0):
    self.label, self.total, self.unit, self.enabled, self.every = label, total, unit, enabled, every
    self.start = time.perf_counter()
    self.last = 0.0
    self.finished = False

  def update(self, done: int, force: bool = False) -> None:
    now = time.perf_counter()
    final = done >= self.total
    if not self.enabled or self.finished or (not (force or final) and now - self.last < self.every):
      return
    self.last, self.finished = now, final
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else float("inf")
    print(f"\r{self.label}: {done}/{self.total} {self.unit} ({rate:.1f}/s, ETA {eta:.0f}s)",
          end="\n" if final else "", file=sys.stderr, flush=True)

  def __call__(self, done: int, _total: int | None = None) -> None:
    self.update(done)
