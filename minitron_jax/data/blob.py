"""Byte ranges of one file, local or in an object store (`gs://`, `s3://`), and whole-file
writes to either.

Local files are memory-mapped; object-store paths go through tensorstore's key-value store,
which reads byte ranges without fetching the whole object. Prepared shards and Megatron
indexed datasets are both flat arrays, so this is all either reader needs. A write is whole or
absent: locally a temporary file renamed into place, in an object store one put (an object
appears complete or not at all).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

# file:// goes through the same key-value store (how the object-store path is tested).
_REMOTE = ("gs://", "s3://", "http://", "https://", "file://")


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` names an object-store location rather than a local file."""
  return os.fspath(path).startswith(_REMOTE)


def join(root: str | os.PathLike, name: str) -> str:
  """`root/name` for local paths and URLs alike."""
  root = os.fspath(root)
  return root.rstrip("/") + "/" + name if is_remote(root) else os.path.join(root, name)


def _kvstore(path: str):
  import tensorstore as ts  # only object-store paths need it

  parent, _, key = path.rpartition("/")
  return ts.KvStore.open(parent + "/").result(), key


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes a whole file or object; a reader sees all of `data` under `path` or nothing
  (locally also durably: `io.files.write_bytes`)."""
  from minitron_jax.io import files

  path = os.fspath(path)
  if is_remote(path):
    kv, key = _kvstore(path)
    kv.write(key, data).result()
  else:
    files.write_bytes(path, data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes a JSON file or object whole, as `io.files.write_json` writes it."""
  write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
  """The JSON document of a file or object."""
  return json.loads(Blob(path).read_bytes())


def makedirs(path: str | os.PathLike) -> None:
  """Creates a local directory (an object store has none to create)."""
  if not is_remote(path):
    os.makedirs(os.fspath(path), exist_ok=True)


class Blob:
  """One file's bytes, read as typed arrays by element range.

  Args:
    path: a local path or a `gs://` / `s3://` URL.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._open()

  def _open(self) -> None:
    self._mmap = None
    self._kv = None
    if not is_remote(self.path):
      self._local = os.path.expanduser(self.path)
    else:
      self._kv, self._key = _kvstore(self.path)

  def __getstate__(self) -> dict:
    # A loader's worker process gets the path, never the bytes (pickling a memory map copies
    # the whole file) nor the key-value store handle; it reopens the file itself.
    return {"path": self.path}

  def __setstate__(self, state: dict) -> None:
    self.path = state["path"]
    self._open()

  def exists(self) -> bool:
    if self._kv is None:
      return os.path.isfile(self._local)
    return self._kv.read(self._key, byte_range=slice(0, 1)).result().state != "missing"

  def size(self) -> int:
    """The file's length in bytes (for an object, by reading it: use `has_size` instead)."""
    if self._kv is None:
      return os.path.getsize(self._local)
    return len(self.read_bytes())

  def has_size(self, nbytes: int) -> bool:
    """Whether the file is exactly `nbytes` long (an object: its last byte and no further)."""
    if self._kv is None:
      return os.path.isfile(self._local) and os.path.getsize(self._local) == nbytes
    if nbytes == 0:
      return self.exists() and not self._kv.read(self._key).result().value
    try:
      tail = self._kv.read(self._key, byte_range=slice(nbytes - 1, None)).result()
    except ValueError:  # the range starts past the end: the object is shorter
      return False
    return tail.state != "missing" and len(tail.value) == 1

  def read_bytes(self) -> bytes:
    if self._kv is None:
      with open(self._local, "rb") as f:
        return f.read()
    result = self._kv.read(self._key).result()
    if result.state == "missing":
      raise FileNotFoundError(f"{self.path}: no such object")
    return result.value

  def array(self, dtype) -> np.ndarray:
    """The whole file as a 1-D array (a read-only memory map for local files)."""
    dtype = np.dtype(dtype)
    if self._kv is None:
      if os.path.getsize(self._local) == 0:
        return np.zeros(0, dtype)
      if self._mmap is None or self._mmap.dtype != dtype:
        self._mmap = np.memmap(self._local, dtype=dtype, mode="r")
      return self._mmap
    return np.frombuffer(self.read_bytes(), dtype)

  def read(self, dtype, start: int, stop: int) -> np.ndarray:
    """Elements `[start, stop)` of the file viewed as an array of `dtype`."""
    dtype = np.dtype(dtype)
    if stop <= start:
      return np.zeros(0, dtype)
    if self._kv is None:
      return np.asarray(self.array(dtype)[start:stop])
    raw = self._kv.read(self._key, byte_range=slice(start * dtype.itemsize,
                                                    stop * dtype.itemsize)).result()
    return np.frombuffer(raw.value, dtype)
