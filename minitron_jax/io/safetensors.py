"""Minimal streaming safetensors reader and writer over numpy (no torch).

Reading memory-maps the file and hands out one tensor at a time; writing streams tensors to
disk one at a time, so neither ever holds a second copy of a whole checkpoint.
The format: an 8-byte little-endian header length, a JSON header
`{name: {dtype, shape, data_offsets}}`, then the raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from minitron_jax.io import files

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
  pass


class SafetensorsFile:
  """Read-only view of one .safetensors file; tensors are memory-mapped on access."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"{self.path}: no such file")
    size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise SafetensorsError(f"{self.path}: truncated safetensors file (no header)")
      (n,) = struct.unpack("<Q", raw)
      if n > min(_MAX_HEADER, size - 8):
        raise SafetensorsError(f"{self.path}: truncated or corrupt safetensors file "
                               f"(header of {n} bytes in a {size}-byte file)")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{self.path}: corrupt safetensors header ({e})") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._start = 8 + n
    self._entries = header
    for name, e in header.items():
      if e.get("dtype") not in DTYPES:
        raise SafetensorsError(f"{self.path}: tensor {name} has unsupported dtype {e.get('dtype')}")
      begin, end = e["data_offsets"]
      want = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
      if end - begin != want:
        raise SafetensorsError(f"{self.path}: tensor {name} has {end - begin} bytes, "
                               f"its shape {e['shape']} needs {want}")
      if self._start + end > size:
        raise SafetensorsError(
            f"{self.path}: truncated file: tensor {name} needs bytes up to "
            f"{self._start + end} but the file has {size}")

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return DTYPES[self._entries[name]["dtype"]]

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only memory-mapped array (copy it to keep it)."""
    e = self._entries[name]
    dtype = DTYPES[e["dtype"]]
    begin, end = e["data_offsets"]
    if end == begin:
      return np.zeros(e["shape"], dtype)
    mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._start + begin,
                   shape=(end - begin,))
    return mm.view(dtype).reshape(e["shape"])


def write(path: str | os.PathLike, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype,
                                                             Callable[[], np.ndarray]]],
          metadata: dict[str, str] | None = None) -> int:
  """Streams tensors into a safetensors file.

  Args:
    path: output file.
    tensors: (name, shape, dtype, produce) where `produce()` returns the array; it is called
      once, right before the tensor is written, so only one tensor is in memory at a time.
    metadata: string-to-string `__metadata__`.

  Returns:
    Bytes of tensor data written.
  """
  tensors = list(tensors)
  header, offset = {}, 0
  for name, shape, dtype, _ in tensors:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header = {"__metadata__": dict(metadata), **header}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  needed = 8 + len(blob) + offset
  files.check_free_space(path, needed)
  with files.no_space_named(path, needed), open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype, produce in tensors:
      arr = np.asarray(produce(), order="C")  # keeps 0-d scalars 0-d
      if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise SafetensorsError(f"tensor {name}: produced {arr.shape} {arr.dtype}, "
                               f"announced {tuple(shape)} {np.dtype(dtype)}")
      f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
  return offset
