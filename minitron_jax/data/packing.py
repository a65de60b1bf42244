"""Windows cut from a token stream (calibration samples for importance estimation, consecutive
windows for held-out loss) and the packing plan of training rows (pieces of at most `seq_len`
tokens, packed best-fit; `data.pipeline` reads the rows)."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from minitron_jax.data.corpus import TokenStream


def _ids(tokens: TokenStream | np.ndarray) -> np.ndarray:
  ids = tokens.tokens if isinstance(tokens, TokenStream) else np.asarray(tokens)
  if ids.ndim != 1:
    raise ValueError(f"expected a 1-D token stream, got shape {ids.shape}")
  return ids


# ---------------------------------------------------------------------------- calibration / eval


def calibration_samples(tokens: TokenStream | np.ndarray, *, num_samples: int = 1024,
                        seq_len: int = 2048, seed: int = 0) -> np.ndarray:
  """Draws `num_samples` distinct windows of the stream, (num_samples, seq_len) int32.

  Windows lie on a grid of non-overlapping slots (shifted by a seeded random offset) and are
  drawn without replacement, so no two samples share a token; they may span documents, EOS
  included. Too short a corpus is an error rather than silently repeated data.
  """
  ids = _ids(tokens)
  if num_samples < 1 or seq_len < 1:
    raise ValueError(f"num_samples and seq_len must be positive, got {num_samples}, {seq_len}")
  n = len(ids)
  if n < seq_len:
    raise ValueError(f"the corpus has {n} tokens, fewer than one window of seq_len={seq_len}")
  slots = n // seq_len
  if slots < num_samples:
    raise ValueError(f"the corpus has {n} tokens: {slots} non-overlapping windows of "
                     f"{seq_len}, fewer than num_samples={num_samples}; lower num_samples or "
                     f"seq_len, or use a larger corpus")
  rng = np.random.default_rng(seed)
  shift = int(rng.integers(0, n - slots * seq_len + 1))
  starts = shift + seq_len * rng.choice(slots, size=num_samples, replace=False)
  return np.asarray(ids[starts[:, None] + np.arange(seq_len)], np.int32)


def calibration_batches(tokens: TokenStream | np.ndarray, *, num_samples: int = 1024,
                        seq_len: int = 2048, batch_size: int = 8, seed: int = 0
                        ) -> Iterator[np.ndarray]:
  """`calibration_samples` in (batch_size, seq_len) batches; the last may be smaller."""
  samples = calibration_samples(tokens, num_samples=num_samples, seq_len=seq_len, seed=seed)
  return (samples[i:i + batch_size] for i in range(0, num_samples, batch_size))  # checks now


def eval_windows(tokens: TokenStream | np.ndarray, seq_len: int) -> np.ndarray:
  """Consecutive non-overlapping windows from the start, (num_windows, seq_len) int32; the tail
  shorter than a window is dropped."""
  ids = _ids(tokens)
  num = len(ids) // seq_len
  if num == 0:
    raise ValueError(f"the stream has {len(ids)} tokens, fewer than one window of {seq_len}")
  return np.asarray(ids[:num * seq_len], np.int32).reshape(num, seq_len)


# ---------------------------------------------------------------------------- packing


def split_pieces(offsets: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Cuts every document into pieces of at most `seq_len` tokens: (starts, lengths)."""
  offsets = np.asarray(offsets, np.int64)
  lengths = np.diff(offsets)
  counts = -(-lengths // seq_len)
  doc = np.repeat(np.arange(len(lengths)), counts)
  k = np.arange(len(doc)) - np.repeat(np.cumsum(counts) - counts, counts)
  starts = offsets[doc] + k * seq_len
  return starts, np.minimum(seq_len, offsets[doc + 1] - starts)


def pack_pieces(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
  """Best-fit decreasing bin packing: (row of each piece, number of rows).

  Longest pieces go first, each into the row with the least room that still fits it, which
  leaves far less padding than filling rows in document order.
  """
  rows_by_room: list[list[int]] = [[] for _ in range(seq_len + 1)]
  have_room = np.zeros(seq_len + 1, bool)  # have_room[r]: some row has exactly r free slots
  row_of = np.empty(len(lengths), np.int64)
  num_rows = 0
  for i in np.argsort(-np.asarray(lengths), kind="stable"):
    need = int(lengths[i])
    room = need + int(np.argmax(have_room[need:]))
    if have_room[room]:
      row = rows_by_room[room].pop()
      have_room[room] = bool(rows_by_room[room])
    else:
      row, room = num_rows, seq_len
      num_rows += 1
    row_of[i] = row
    if room - need > 0:
      rows_by_room[room - need].append(row)
      have_room[room - need] = True
  return row_of, num_rows
