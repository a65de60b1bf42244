"""Training batches through Grain: packed rows of one or more document sources, shuffled per
epoch, blended by weight, and read by each JAX process for its own rows only.

A *document source* (`corpus.open_documents`: prepared shards, a Megatron indexed dataset, text
prepared on the fly) gives document lengths and reads token ranges. Each source's documents are
cut into pieces of at most `seq_len` tokens and packed into rows (`packing.pack_pieces`, from
the lengths alone); a row holds its pieces as segments 1, 2, ... (0 is padding) whose positions
restart at 0, so attention never crosses documents.

The rows form one endless Grain `MapDataset`: each source's rows reshuffled every epoch
(`EpochShuffled`), sources interleaved by weight (`MapDataset.mix`), and global batch `k`
is rows `[k*B, (k+1)*B)` of it. Process `i` of `P` reads rows `[k*B + i*B/P, k*B + (i+1)*B/P)`
(every `P`-th batch of `B/P` rows, a lazy slice: it never reads another process's tokens), so
the processes' rows are disjoint and, concatenated, are the global batch. A `MapDataset` is a pure function of the index, so
the iterator's state is one number, the rows served; it goes into the checkpoint, and a resumed
run (with any process count) sees exactly the batches it would have seen.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np

from minitron_jax.data import blend, packing
from minitron_jax.data.tokens import StreamDocuments, TokenStream

STATE_VERSION = 2


def as_documents(source):
  """A document source from a source or a `TokenStream`."""
  return StreamDocuments(source) if isinstance(source, TokenStream) else source


def training_loader(data, **kwargs) -> "Loader":
  """The loader of a run's training data: one source (`corpus.open_documents`, a
  `TokenStream`) or a blend of several (`blend.Blend`, its rows mixed by its weights);
  `kwargs` go to `Loader`."""
  if isinstance(data, blend.Blend):
    return Loader(data.parts, weights=data.weights, **kwargs)
  return Loader([data], **kwargs)


class PackedRows:
  """Random access to the packed rows of one document source (a Grain data source).

  Args:
    docs: a document source (`lengths`, `read(doc, start, stop)`).
    seq_len: tokens per row.
    pad_id: token id of padding slots.
  """

  def __init__(self, docs, seq_len: int, pad_id: int = 0):
    if seq_len < 1:
      raise ValueError(f"seq_len must be positive, got {seq_len}")
    self.docs, self.seq_len, self.pad_id = docs, seq_len, pad_id
    lengths = np.asarray(docs.lengths, np.int64)
    if not len(lengths) or not lengths.sum():
      raise ValueError(f"{getattr(docs, 'name', 'the source')}: no tokens to train on")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    starts, piece_len = packing.split_pieces(offsets, seq_len)
    row_of, self.num_rows = packing.pack_pieces(piece_len, seq_len)
    # Pieces grouped by row, in source order within a row: row r owns pieces
    # [row_ptr[r], row_ptr[r + 1]).
    order = np.argsort(row_of, kind="stable")
    doc = np.searchsorted(offsets, starts, side="right") - 1
    self._doc, self._begin = doc[order], (starts - offsets[doc])[order]
    self._len = piece_len[order]
    self._row_ptr = np.searchsorted(row_of[order], np.arange(self.num_rows + 1))

  def __len__(self) -> int:
    return self.num_rows

  @property
  def padding_fraction(self) -> float:
    """Share of row slots that hold padding."""
    return 1.0 - float(self._len.sum()) / (self.num_rows * self.seq_len)

  def __getitem__(self, r: int) -> dict[str, np.ndarray]:
    """Row `r`: tokens, segment_ids, positions, each (seq_len,) int32."""
    tokens = np.full(self.seq_len, self.pad_id, np.int32)
    segment_ids = np.zeros(self.seq_len, np.int32)
    positions = np.zeros(self.seq_len, np.int32)
    at = 0
    for seg, p in enumerate(range(self._row_ptr[r], self._row_ptr[r + 1]), 1):
      begin, length = int(self._begin[p]), int(self._len[p])
      tokens[at:at + length] = self.docs.read(int(self._doc[p]), begin, begin + length)
      segment_ids[at:at + length] = seg
      positions[at:at + length] = np.arange(length)
      at += length
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


class EpochShuffled:
  """The rows of a source endlessly, epoch `e` in the order of a permutation seeded with
  `(seed, e)` (source `k > 0`: `(seed, e, k)`, so sources and seeds never replay each other).
  A random-access Grain source; the order of the data path before Grain, so a run's batches,
  and the recipe's published figures, are unchanged (one `num_rows` permutation per epoch)."""

  def __init__(self, rows: PackedRows, seed: int, k: int = 0):
    self.rows, self.seed, self.k = rows, seed, k
    self._perm: tuple[int, np.ndarray] | None = None

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    epoch, r = divmod(int(i), self.rows.num_rows)
    if self._perm is None or self._perm[0] != epoch:
      key = (self.seed, epoch) if self.k == 0 else (self.seed, epoch, self.k)
      self._perm = (epoch, np.random.default_rng(key).permutation(self.rows.num_rows))
    return self.rows[int(self._perm[1][r])]


class Loader:
  """This process's rows of each global batch, endlessly; `state()` / `restore()` resume.

  Args:
    sources: document sources (or `TokenStream`s), blended by `weights`.
    weights: each source's share of the rows (normalised); None: one source, or equal shares.
    seq_len: tokens per row.
    global_batch_size: rows per global batch, divisible by `process_count`.
    seed: the shuffle.
    pad_id: token id of padding slots.
    process_index, process_count: which slice of every batch this process reads.
    state: a `state()` to continue from.
    num_threads: Grain reader threads (0: read in the caller's thread).
    num_workers: Grain worker processes (0: none). Each reads every `num_workers`-th batch of
      this process's batches, and Grain interleaves them back in order, so the batches are
      the same at any count; workers are spawned and get the sources by path, not by bytes.
  """

  def __init__(self, sources: Sequence, *, seq_len: int, global_batch_size: int,
               weights: Sequence[float] | None = None, seed: int = 0, pad_id: int = 0,
               process_index: int = 0, process_count: int = 1, state: dict | None = None,
               num_threads: int = 0, num_workers: int = 0):
    import grain  # the loader's one dependency beyond numpy

    if not sources:
      raise ValueError("no training sources")
    if weights is not None and (len(weights) != len(sources) or min(weights) <= 0):
      raise ValueError(f"need one positive weight per source, got {list(weights)} for "
                       f"{len(sources)} sources")
    if seq_len < 1 or global_batch_size < 1:
      raise ValueError(f"seq_len and global_batch_size must be positive, got {seq_len}, "
                       f"{global_batch_size}")
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                       f"process_count={process_count}")
    if num_threads < 0 or num_workers < 0:
      raise ValueError(f"num_threads and num_workers must be >= 0, got {num_threads}, "
                       f"{num_workers}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    self.seq_len, self.seed, self.global_batch_size = seq_len, int(seed), global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self._index, self._count, self._threads = process_index, process_count, num_threads
    self._workers = num_workers
    self.sources = [PackedRows(as_documents(s), seq_len, pad_id) for s in sources]
    self.weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    total = sum(self.weights)
    self.weights = [w / total for w in self.weights]
    rows = [grain.MapDataset.source(EpochShuffled(r, self.seed, k))
            for k, r in enumerate(self.sources)]
    self._rows = rows[0] if len(rows) == 1 else grain.MapDataset.mix(rows, self.weights)
    self._grain = grain
    self._position = 0
    self._it = None
    if state is not None:
      self.restore(state)

  @property
  def num_rows(self) -> list[int]:
    return [r.num_rows for r in self.sources]

  @property
  def padding_fraction(self) -> float:
    pad = sum(r.padding_fraction * r.num_rows for r in self.sources)
    return pad / sum(self.num_rows)

  def row(self, position: int) -> dict[str, np.ndarray]:
    """Row `position` of the endless global row sequence."""
    return self._rows[position]

  def _iterator(self):
    # Batches of local_batch_size consecutive rows, every process_count-th from this process's
    # first: process i reads rows [k*B + i*L, k*B + (i + 1)*L) of global batch k.
    local = self._rows[self._position:].batch(self.local_batch_size)[self._index::self._count]
    options = self._grain.ReadOptions(num_threads=self._threads,
                                      prefetch_buffer_size=2 * self._threads)
    ds = local.to_iter_dataset(options)
    if self._workers:
      from absl import flags

      if not flags.FLAGS.is_parsed():  # a library caller: Grain reads its flags' defaults
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(self._grain.MultiprocessingOptions(num_workers=self._workers,
                                                             per_worker_buffer_size=2))
    return iter(ds)

  def state(self) -> dict:
    """The rows served so far and what they depend on; plain values, safe to store as JSON."""
    return {"version": STATE_VERSION, "position": self._position, "seed": self.seed,
            "seq_len": self.seq_len, "num_rows": self.num_rows,
            "weights": [round(w, 12) for w in self.weights]}

  def restore(self, state: dict) -> None:
    """Continues from `state()`; the batch size or process count may differ from the saver's."""
    if state.get("version") != STATE_VERSION:
      raise ValueError("the checkpoint's data position was saved by an older data loader; "
                       "start the run in a new output directory")
    mine = self.state()
    for name in ("seed", "seq_len", "num_rows", "weights"):
      if state[name] != mine[name]:
        raise ValueError(f"the state was saved with {name}={state[name]}, but this dataset has "
                         f"{name}={mine[name]} (different data or settings?)")
    self.close()
    self._position = int(state["position"])

  def close(self) -> None:
    """Stops the worker processes, if any (a later `next` starts them again)."""
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()

  def __enter__(self) -> "Loader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __iter__(self) -> "Loader":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """This process's rows of the next global batch, each entry (local_batch_size, seq_len)."""
    if self._it is None:
      self._it = self._iterator()
    batch = next(self._it)
    self._position += self.global_batch_size
    return {k: np.asarray(v) for k, v in batch.items()}

