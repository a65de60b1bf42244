"""Windows and packed batches cut from a token stream: calibration samples for importance
estimation, consecutive windows for held-out loss, and packed, shuffled, resumable, host-sharded
batches for distillation (documents never attend across pieces)."""

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


class PackedDataset:
  """Packed, shuffled, resumable and host-sharded batches of a token stream.

  Documents are cut into pieces of at most `seq_len` tokens and packed into rows; each piece is
  its own segment (ids 1, 2, ... within a row, 0 for padding) whose positions restart at 0, so
  with `model.forward(..., positions_bt, segment_ids_bt)` attention never crosses pieces.

  Rows form an endless sequence: epoch `e` is every row once, in the order of a permutation
  seeded with `(seed, e)`, and global batch `k` is rows `[k*B, (k+1)*B)` of that sequence, so no
  row is dropped and a batch may straddle two epochs. Host `i` of `P` yields the rows
  `[i*B/P, (i+1)*B/P)` of each global batch. The state is a position in the sequence.
  """

  def __init__(self, stream: TokenStream, *, seq_len: int, global_batch_size: int, seed: int = 0,
               pad_id: int = 0, process_index: int | None = None,
               process_count: int | None = None, state: dict[str, int] | None = None):
    if process_index is None or process_count is None:
      import jax

      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if seq_len < 1 or global_batch_size < 1:
      raise ValueError(f"seq_len and global_batch_size must be positive, got {seq_len}, "
                       f"{global_batch_size}")
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                       f"process_count={process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    self.stream, self.seq_len, self.seed, self.pad_id = stream, seq_len, int(seed), pad_id
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self._first_local = process_index * self.local_batch_size
    starts, lengths = split_pieces(stream.offsets, seq_len)
    row_of, self.num_rows = pack_pieces(lengths, seq_len)
    if self.num_rows == 0:
      raise ValueError("the token stream is empty")
    # Pieces grouped by row, in stream order within a row: row r owns
    # pieces[row_ptr[r]:row_ptr[r + 1]].
    order = np.argsort(row_of, kind="stable")
    self._starts, self._lengths = starts[order], lengths[order]
    self._row_ptr = np.searchsorted(row_of[order], np.arange(self.num_rows + 1))
    self._position = 0
    self._perm: tuple[int, np.ndarray] | None = None
    if state is not None:
      self.restore(state)

  @property
  def padding_fraction(self) -> float:
    """Share of row slots that hold padding."""
    return 1.0 - float(self._lengths.sum()) / (self.num_rows * self.seq_len)

  def row(self, r: int) -> dict[str, np.ndarray]:
    """Packed row `r` (before shuffling): tokens, segment_ids, positions (T,)."""
    tokens = np.full(self.seq_len, self.pad_id, np.int32)
    segment_ids = np.zeros(self.seq_len, np.int32)
    positions = np.zeros(self.seq_len, np.int32)
    at = 0
    for seg, p in enumerate(range(self._row_ptr[r], self._row_ptr[r + 1]), 1):
      start, length = self._starts[p], self._lengths[p]
      tokens[at:at + length] = self.stream.tokens[start:start + length]
      segment_ids[at:at + length] = seg
      positions[at:at + length] = np.arange(length)
      at += length
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}

  def _row_at(self, position: int) -> int:
    epoch, i = divmod(position, self.num_rows)
    if self._perm is None or self._perm[0] != epoch:
      # Seeded by the pair, not seed + epoch, so seed 1 does not replay seed 0's second epoch.
      rng = np.random.default_rng((self.seed, epoch))
      self._perm = (epoch, rng.permutation(self.num_rows))
    return int(self._perm[1][i])

  def state(self) -> dict[str, int]:
    """The position after the last batch served; plain ints, safe to store as JSON."""
    epoch, row = divmod(self._position, self.num_rows)
    return {"seed": self.seed, "epoch": epoch, "row": row, "num_rows": self.num_rows,
            "seq_len": self.seq_len}

  def restore(self, state: dict[str, int]) -> None:
    """Continues from `state()`; the batch size or process count may differ from the saver's."""
    for name in ("seed", "num_rows", "seq_len"):
      if int(state[name]) != getattr(self, name):
        raise ValueError(f"the state was saved with {name}={state[name]}, but this dataset has "
                         f"{name}={getattr(self, name)} (different data or settings?)")
    self._position = int(state["epoch"]) * self.num_rows + int(state["row"])

  def __iter__(self) -> "PackedDataset":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """This host's rows of the next global batch, each entry (local_batch_size, seq_len)."""
    first = self._position + self._first_local
    rows = [self.row(self._row_at(first + i)) for i in range(self.local_batch_size)]
    self._position += self.global_batch_size
    return {k: np.stack([r[k] for r in rows]) for k in ("tokens", "segment_ids", "positions")}
