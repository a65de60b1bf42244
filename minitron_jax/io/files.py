"""Writing outputs so that a reader never sees half of one: text, JSON and JSON-lines files and
whole directories appear under their final name only when complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterable


def write_text(path: str, text: str) -> None:
  """Writes a UTF-8 text file atomically (temp file + rename)."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically, so a reader never sees half a file."""
  write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
  """The JSON document at `path`."""
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_jsonl(path: str, records: Iterable[Any]) -> None:
  """Writes one JSON record per line, atomically."""
  write_text(path, "".join(json.dumps(r) + "\n" for r in records))


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False):
  """Yields a temporary sibling directory that becomes `out_dir` only on success."""
  out_dir = os.path.abspath(os.fspath(out_dir))
  check_output_dir(out_dir, overwrite, flag="overwrite")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the result private
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.isdir(out_dir):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
    os.replace(out_dir, os.path.join(old, "x"))
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, out_dir)


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool, flag: str = "--overwrite"
                     ) -> None:
  """Refuses an output directory that is a file, or is not empty unless `overwrite`."""
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f"{out_dir}: exists and is not a directory")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir}: exists and is not empty (pass {flag} to replace it)")


WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def weight_bytes(model_dir: str | os.PathLike, skip: tuple[str, ...] = ()) -> int:
  """Bytes of the weight files (safetensors, GGUF) under a directory, not descending into
  subdirectories named in `skip` (e.g. training checkpoints)."""
  total = 0
  for root, dirs, names in os.walk(model_dir):
    dirs[:] = [d for d in dirs if d not in skip]
    total += sum(os.path.getsize(os.path.join(root, f)) for f in names
                 if f.endswith(WEIGHT_SUFFIXES))
  return total
