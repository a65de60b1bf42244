"""Megatron indexed datasets (`.bin` / `.idx`, as NeMo and Megatron-LM write them), read as
they are: no conversion, local or from `gs://`.

The format (megatron-core `datasets/indexed_dataset.py`, `_IndexWriter`): the `.idx` file is

    b"MMIDIDX\\x00\\x00"   header (9 bytes)
    <Q version (1)      <B dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                                       7 float32, 8 uint16)
    <Q sequence count S  <Q document count D + 1
    int32[S]  tokens per sequence
    int64[S]  byte offset of each sequence in `.bin`
    int64[D + 1]  sequence index where each document starts, plus the end
    int8[S]   (multimodal datasets only) each sequence's mode

and the `.bin` file is every sequence's token ids back to back. A document is its sequences in
order (usually one, ending in the end-of-document token when the data was built with
`--append-eod`).
"""

from __future__ import annotations

import os
import struct

import numpy as np

from minitron_jax.data import blob
from minitron_jax.data.prepared import DataError

HEADER = b"MMIDIDX\x00\x00"
DTYPES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}
_FIXED = len(HEADER) + 8 + 1 + 8 + 8


def is_indexed(prefix: str | os.PathLike) -> bool:
  """Whether `prefix.idx` exists (the path prefix of a Megatron indexed dataset)."""
  return blob.Blob(os.fspath(prefix) + ".idx").exists()


def read_index(idx: bytes, where: str) -> dict:
  """The parsed `.idx` file: dtype, sequence lengths and pointers, document indices."""
  if len(idx) < _FIXED or idx[:len(HEADER)] != HEADER:
    raise DataError(f"{where}: not a Megatron index (bad header)")
  version, code, seqs, docs = struct.unpack_from("<QBQQ", idx, len(HEADER))
  if version != 1 or code not in DTYPES:
    raise DataError(f"{where}: unsupported index version {version} or dtype code {code}")
  plain = _FIXED + seqs * (4 + 8) + docs * 8
  if len(idx) not in (plain, plain + seqs):
    raise DataError(f"{where}: {len(idx)} bytes, but its counts ({seqs} sequences, {docs - 1} "
                    f"documents) need {plain}: truncated or damaged")
  lengths = np.frombuffer(idx, np.int32, seqs, _FIXED)
  pointers = np.frombuffer(idx, np.int64, seqs, _FIXED + 4 * seqs)
  doc_index = np.frombuffer(idx, np.int64, docs, _FIXED + 12 * seqs)
  if docs < 1 or doc_index[0] != 0 or doc_index[-1] != seqs or np.any(np.diff(doc_index) < 0):
    raise DataError(f"{where}: document indices do not run from 0 to the sequence count")
  return {"dtype": np.dtype(DTYPES[code]), "lengths": lengths, "pointers": pointers,
          "doc_index": doc_index}


class MegatronSource:
  """The documents of a Megatron indexed dataset `prefix.bin` / `prefix.idx`.

  Args:
    prefix: the path prefix (local or `gs://...`), as Megatron's `--data-path` takes it.
    vocab_size: when given, an integer dtype too narrow for it is refused (a dataset of another
      tokenizer).
  """

  def __init__(self, prefix: str | os.PathLike, *, vocab_size: int | None = None):
    self.prefix = os.fspath(prefix)
    idx_path = self.prefix + ".idx"
    index = read_index(blob.Blob(idx_path).read_bytes(), idx_path)
    self.dtype = index["dtype"]
    if self.dtype.kind == "f":
      raise DataError(f"{idx_path}: holds {self.dtype} values, not token ids")
    if vocab_size and np.iinfo(self.dtype).max < vocab_size - 1:
      raise DataError(f"{idx_path}: {self.dtype} ids cannot hold this tokenizer's "
                      f"{vocab_size} tokens (made with another tokenizer?)")
    seq_len, ptr, doc_index = index["lengths"], index["pointers"], index["doc_index"]
    item = self.dtype.itemsize
    self._bin = blob.Blob(self.prefix + ".bin")
    nbytes = int(ptr[-1] + seq_len[-1] * item) if len(ptr) else 0
    if not self._bin.has_size(nbytes):
      raise DataError(f"{self._bin.path}: missing or truncated (its index needs {nbytes} "
                      "bytes)")
    # Sequences are written back to back, so document d spans one element range.
    seq_cum = np.concatenate([[0], np.cumsum(seq_len, dtype=np.int64)])
    if len(ptr) and not np.array_equal(ptr, seq_cum[:-1] * item):
      raise DataError(f"{idx_path}: sequence pointers are not contiguous")
    self._start = seq_cum[doc_index[:-1]]
    self.lengths = (seq_cum[doc_index[1:]] - self._start).astype(np.int64)
    self._total = int(seq_cum[-1])

  @property
  def name(self) -> str:
    return self.prefix

  @property
  def num_documents(self) -> int:
    return len(self.lengths)

  def fingerprint(self) -> dict:
    return {"megatron": self.prefix, "documents": self.num_documents, "tokens": self._total}

  def read(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Tokens `[start, stop)` of document `doc` as int32."""
    base = int(self._start[doc])
    stop = int(self.lengths[doc]) if stop is None else stop
    return self._bin.read(self.dtype, base + start, base + stop).astype(np.int32)

  def all_tokens(self) -> np.ndarray:
    return np.asarray(self._bin.array(self.dtype)[:self._total]).astype(np.int32)
