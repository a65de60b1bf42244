"""Writing outputs so that a reader never sees half of one: text, JSON and JSON-lines files and
whole directories appear under their final name only when complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterable

from minitron_jax import errors


def check_free_space(path: str, needed: int) -> None:
  """Refuses, before writing, a file of `needed` bytes that its filesystem has no room for."""
  free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
  if free < needed:
    raise errors.DiskFullError(f"{path}: needs {needed:,} bytes, and its filesystem has "
                               f"{free:,} free; free some space and run the same command again")


@contextlib.contextmanager
def no_space_named(path: str, needed: int):
  """Turns a write refused for lack of space (or a file-size limit) into a `DiskFullError`
  naming `path` and the `needed` bytes."""
  try:
    yield
  except OSError as e:
    if not errors.no_space(e):
      raise
    raise errors.DiskFullError(f"{path}: the filesystem refused the write ({e.strerror}); it "
                               f"needs {needed:,} bytes; free some space and run the same "
                               "command again") from None


def fsync_dir(path: str) -> None:
  """Makes a rename or a new entry in directory `path` durable (after a power loss too)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def fsync_tree(root: str) -> None:
  """fsyncs every file under `root`, then every directory bottom up."""
  for dirpath, _, names in os.walk(root, topdown=False):
    for name in names:
      path = os.path.join(dirpath, name)
      if os.path.isfile(path) and not os.path.islink(path):
        fd = os.open(path, os.O_RDONLY)
        try:
          os.fsync(fd)
        finally:
          os.close(fd)
    fsync_dir(dirpath)


def write_text(path: str, text: str) -> None:
  """Writes a UTF-8 text file atomically and durably (`write_bytes`)."""
  write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
  """Writes a file atomically and durably: temp file, fsync, rename, fsync of the directory
  (a file that exists under its final name is complete, even after a power loss)."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
  try:
    with no_space_named(path, len(data)), os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
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
  """Yields a temporary sibling directory that becomes `out_dir` only on success: its files'
  checksums are written beside them (`CHECKSUMS`), every file is fsynced before the rename and
  the parent directory after it."""
  out_dir = os.path.abspath(os.fspath(out_dir))
  check_output_dir(out_dir, overwrite, flag="overwrite")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  _remove_leftovers(parent, os.path.basename(out_dir))
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the result private
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  write_checksums(tmp)
  fsync_tree(tmp)
  if os.path.isdir(out_dir):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
    os.replace(out_dir, os.path.join(old, "x"))
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, out_dir)
  fsync_dir(parent)


CHECKSUMS = "checksums.sha256"  # `sha256sum -c checksums.sha256` verifies a directory too


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _files_under(root: str) -> list[str]:
  out = []
  for dirpath, dirs, names in os.walk(root):
    dirs.sort()
    out += sorted(os.path.relpath(os.path.join(dirpath, n), root) for n in names
                  if not (dirpath == root and n == CHECKSUMS))
  return out


def write_checksums(root: str) -> None:
  """Writes `root/CHECKSUMS`: the SHA-256 of every file under `root`, in sha256sum's format."""
  lines = [f"{_sha256(os.path.join(root, rel))}  {rel}\n" for rel in _files_under(root)]
  with open(os.path.join(root, CHECKSUMS), "w", encoding="utf-8") as f:
    f.writelines(lines)


def verify_checksums(root: str) -> list[str]:
  """What is wrong with a directory written by `atomic_output_dir`: files missing, or whose
  content differs from the checksum written with them. [] when intact, or when the directory
  has no checksum file (written before checksums were kept)."""
  manifest = os.path.join(root, CHECKSUMS)
  if not os.path.isfile(manifest):
    return []
  problems = []
  with open(manifest, encoding="utf-8") as f:
    for line in f:
      digest, _, rel = line.rstrip("\n").partition("  ")
      path = os.path.join(root, rel)
      if not os.path.isfile(path):
        problems.append(f"{path}: missing")
      elif _sha256(path) != digest:
        problems.append(f"{path}: content differs from its checksum ({os.path.getsize(path)} "
                        "bytes)")
  return problems


def _remove_leftovers(parent: str, name: str) -> None:
  """Removes what a killed earlier write of `parent/name` left: its temporary directory and
  the old copy it was replacing (one writer per output: the recipe and distillation hold a
  lock on their directories)."""
  for entry in os.listdir(parent):
    if entry.startswith((f".{name}.tmp-", f".{name}.old-")):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


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
