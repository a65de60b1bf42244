"""Pre-tokenized shards: the on-disk format `launch/prepare_data.py` writes, and its reader.

A prepared directory holds, for shard `k` (documents `[k*D, (k+1)*D)` of the source in its
deterministic order, `D = docs_per_shard`):

    shard-0000k.tokens    the documents' token ids back to back, EOS after each (raw
                          little-endian `uint16` when the vocabulary fits, else `int32`)
    shard-0000k.offsets   document start offsets into it, plus the end (raw `int64`)
    shard-0000k.json      its document and token counts, sizes and SHA-256 (written last: a
                          shard whose record exists is complete)
    manifest.json         the tokenizer's fingerprint, the source, totals and every shard's
                          record (written when every shard is done)

Flat arrays read by byte range (`data.blob`) from local disks and object stores alike; the
same layout as a Megatron indexed dataset, so one document reader serves both.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from minitron_jax.data import blob

FORMAT = "minitron-jax-tokens"
VERSION = 1
MANIFEST = "manifest.json"
OFFSETS_DTYPE = np.dtype("<i8")


class DataError(ValueError):
  """A prepared or indexed dataset is damaged or does not match the run (named in the text)."""


def token_dtype(vocab_size: int) -> np.dtype:
  """`uint16` when every id fits, else `int32` (little-endian)."""
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def shard_name(index: int) -> str:
  return f"shard-{index:05d}"


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def shard_record(index: int, tokens: bytes, offsets: bytes, documents: int, dtype) -> dict:
  """The record of one shard as the manifest keeps it."""
  return {"name": shard_name(index), "documents": documents,
          "tokens": len(tokens) // np.dtype(dtype).itemsize,
          "bytes": {"tokens": len(tokens), "offsets": len(offsets)},
          "sha256": {"tokens": sha256(tokens), "offsets": sha256(offsets)}}


def read_manifest(path: str | os.PathLike) -> dict:
  """The manifest of a prepared directory; a clear error when there is none."""
  where = blob.join(path, MANIFEST)
  b = blob.Blob(where)
  if not b.exists():
    raise DataError(f"{path}: not a prepared dataset (no {MANIFEST}; write one with "
                    "launch/prepare_data.py, or it was interrupted: run it again to resume)")
  try:
    manifest = json.loads(b.read_bytes())
  except json.JSONDecodeError as e:
    raise DataError(f"{where}: invalid JSON ({e.msg})") from None
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise DataError(f"{where}: not a {FORMAT} v{VERSION} manifest")
  return manifest


def is_prepared(path: str | os.PathLike) -> bool:
  """Whether `path` is a prepared directory (has a manifest)."""
  return blob.Blob(blob.join(path, MANIFEST)).exists()


class PreparedSource:
  """The documents of a prepared directory, checked against its manifest before any read.

  Args:
    path: the directory (local or `gs://...`).
    tokenizer_fingerprint: when given, must equal the manifest's (`corpus.tokenizer_fingerprint`
      of the run's tokenizer): ids from another tokenizer are refused.
    verify: also compare every shard's SHA-256 (reads every byte; sizes are always checked).
  """

  def __init__(self, path: str | os.PathLike, *, tokenizer_fingerprint: str | None = None,
               verify: bool = False):
    self.path = os.fspath(path)
    self.manifest = m = read_manifest(self.path)
    if tokenizer_fingerprint and m["tokenizer"]["fingerprint"] != tokenizer_fingerprint:
      raise DataError(f"{self.path}: prepared with another tokenizer ({m['tokenizer']['name']}, "
                      f"fingerprint {m['tokenizer']['fingerprint'][:12]}) than this run's "
                      f"(fingerprint {tokenizer_fingerprint[:12]}); prepare it again")
    if not m["shards"] or m["documents"] == 0:
      raise DataError(f"{self.path}: the prepared dataset holds no documents")
    self.dtype = np.dtype(m["dtype"])
    self._tokens, offsets = [], []
    for rec in m["shards"]:
      tok, off = (blob.Blob(blob.join(self.path, f"{rec['name']}.{part}"))
                  for part in ("tokens", "offsets"))
      for part, b in (("tokens", tok), ("offsets", off)):
        if not b.has_size(rec["bytes"][part]):
          raise DataError(f"{b.path}: missing or truncated (the manifest says "
                          f"{rec['bytes'][part]} bytes); prepare the dataset again")
        if verify and sha256(b.read_bytes()) != rec["sha256"][part]:
          raise DataError(f"{b.path}: content differs from its checksum in {MANIFEST}")
      o = off.array(OFFSETS_DTYPE)
      if len(o) != rec["documents"] + 1 or o[0] != 0 or o[-1] != rec["tokens"]:
        raise DataError(f"{off.path}: offsets do not match the manifest's counts")
      self._tokens.append(tok)
      offsets.append(np.asarray(o))
    self._doc_start = np.concatenate([[0], np.cumsum([len(o) - 1 for o in offsets])])
    self._offsets = offsets
    self.lengths = np.concatenate([np.diff(o) for o in offsets]).astype(np.int64)

  @property
  def name(self) -> str:
    return self.path

  @property
  def num_documents(self) -> int:
    return len(self.lengths)

  def fingerprint(self) -> dict:
    return {"prepared": self.path, "documents": self.num_documents,
            "tokens": int(self.manifest["tokens"])}

  def _locate(self, doc: int) -> tuple[int, int]:
    shard = int(np.searchsorted(self._doc_start, doc, side="right")) - 1
    return shard, int(self._offsets[shard][doc - self._doc_start[shard]])

  def read(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Tokens `[start, stop)` of document `doc` as int32."""
    shard, base = self._locate(doc)
    stop = int(self.lengths[doc]) if stop is None else stop
    return self._tokens[shard].read(self.dtype, base + start, base + stop).astype(np.int32)

  def all_tokens(self) -> np.ndarray:
    """Every token, documents in order, as one int32 array (for small datasets)."""
    parts = [t.array(self.dtype) for t in self._tokens]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

  def offsets(self) -> np.ndarray:
    """Global document start offsets plus the end (int64)."""
    return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
