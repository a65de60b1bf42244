"""One writer per output directory: an exclusive lock held for a run's lifetime.

The lock is `fcntl.flock` on `<directory>/.lock`, which the kernel drops when its holder dies
however it dies (SIGKILL included), so a crashed run never leaves a lock that blocks the next
one. The file also holds the holder's PID, host and start time: a second process is refused at
once with those, and a process that finds a dead holder's record says that it takes over.

Multi-host runs share one run directory; only process 0 takes the lock (the others follow it).
Object-store paths (`gs://...`) have no such locks and are not locked.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys

from minitron_jax.errors import UnavailableError


class LockedError(UnavailableError):
  """The directory is held by another live process (reported as one `error:` line)."""


def _holder_text(record: dict) -> str:
  return (f"process {record.get('pid', '?')} on host {record.get('host', '?')} (since "
          f"{record.get('started', '?')})")


def _read_record(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  raw = os.read(fd, 4096)
  try:
    record = json.loads(raw.decode("utf-8")) if raw.strip() else {}
  except (UnicodeDecodeError, json.JSONDecodeError):
    record = {}
  return record if isinstance(record, dict) else {}


class DirectoryLock:
  """`with DirectoryLock(path, what="run directory"):` holds `path/.lock` exclusively.

  Raises:
    LockedError: another live process holds it; the message names its PID and host.
  """

  NAME = ".lock"

  def __init__(self, directory: str, what: str = "directory",
               log=lambda msg: print(msg, file=sys.stderr, flush=True)):
    self.directory = directory
    self.path = os.path.join(directory, self.NAME)
    self.what = what
    self.log = log
    self._fd: int | None = None
    self.took_over: dict | None = None  # the record of a dead holder this lock replaced

  def acquire(self) -> "DirectoryLock":
    if "://" in self.directory:
      return self
    os.makedirs(self.directory, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        record = _read_record(fd)
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
          raise
        raise LockedError(
            f"{self.directory}: this {self.what} is in use by {_holder_text(record)}; wait for "
            f"it to finish or stop it (the lock {self.path} is released when it exits)") from None
      try:  # the holder may have removed the file between our open and our lock: retry
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    old = _read_record(fd)
    if old.get("pid") is not None:
      self.took_over = old
      self.log(f"{self.directory}: taking over the lock of {_holder_text(old)}, which is no "
               "longer running")
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.remove(self.path)  # while still holding it: a waiter then retries on a new file
    except FileNotFoundError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "DirectoryLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# Where launchers put a process's index (TPU VMs, SLURM, MPI, JAX's own variable).
PROCESS_INDEX_VARS = ("JAX_PROCESS_ID", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID", "SLURM_PROCID",
                      "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def env_process_index() -> int:
  """This process's index in a multi-host launch as its launcher's environment gives it (0
  when none does), read without starting JAX (the recipe's orchestrator must not hold
  accelerators its stages need)."""
  for name in PROCESS_INDEX_VARS:
    value = os.environ.get(name, "").strip()
    if value.isdigit():
      return int(value)
  return 0


def lock_directory(directory: str, what: str = "directory", process_index: int | None = None
                   ) -> DirectoryLock:
  """A `DirectoryLock` that only process 0 of a multi-process run takes (the others share the
  directory with it and follow its lead). `process_index` defaults to `env_process_index()`."""
  index = env_process_index() if process_index is None else process_index
  if index != 0:
    return DirectoryLock("gs://not-locked", what)  # a no-op lock
  return DirectoryLock(directory, what)
