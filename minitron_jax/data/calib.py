"""Calibration data as one spec, shared by every stage that calibrates (importance, the
architecture search, GPTQ / AWQ, QAD's calibrated start)."""

from __future__ import annotations

import dataclasses

import numpy as np

from minitron_jax.settings import SettingError, check_positive


@dataclasses.dataclass(frozen=True)
class CalibSpec:
  """Where calibration windows come from and how many.

  Attributes:
    data: any source `data.corpus.load_tokens` reads (a file, directory, glob, jsonl, hub
      name, `shakespeare`).
    samples: windows drawn (distinct, non-overlapping; `packing.calibration_samples`).
    seq_len: tokens per window.
    batch_size: windows per forward pass.
    seed: which windows.
  """

  data: str = "shakespeare"
  samples: int = 64
  seq_len: int = 256
  batch_size: int = 8
  seed: int = 0

  def validate(self, prefix: str = "calib.") -> None:
    if not self.data:
      raise SettingError(prefix + "data", "{name} is empty: name a calibration source")
    check_positive(self, "samples", "seq_len", "batch_size", prefix=prefix)

  def windows(self, tokens, extra: int = 0) -> np.ndarray:
    """(samples + extra, seq_len) int32 windows of `tokens` (a `corpus.TokenStream` or ids)."""
    from minitron_jax.data import packing

    return packing.calibration_samples(tokens, num_samples=self.samples + extra,
                                       seq_len=self.seq_len, seed=self.seed)

  def batches(self, windows: np.ndarray) -> list[np.ndarray]:
    """`windows` cut into batches of `batch_size` rows (the last may be smaller)."""
    return [windows[i:i + self.batch_size] for i in range(0, len(windows), self.batch_size)]
