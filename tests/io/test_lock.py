"""One writer per directory: a live holder refuses a second process; a dead one is taken over."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minitron_jax.io import lock

HOLD = textwrap.dedent("""
    import sys, time
    from minitron_jax.io import lock
    with lock.DirectoryLock(sys.argv[1], "run directory"):
      print("held", flush=True)
      time.sleep(60)
""")


def _holder(directory):
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE,
                          text=True, cwd=Path(lock.__file__).parents[2])
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_second_process_is_refused_naming_the_holder(tmp_path):
  proc = _holder(tmp_path)
  try:
    with pytest.raises(lock.LockedError) as e:
      lock.DirectoryLock(str(tmp_path), "run directory").acquire()
    assert f"process {proc.pid} on host {socket.gethostname()}" in str(e.value)
    assert str(tmp_path) in str(e.value)
  finally:
    proc.kill()
    proc.wait()


def test_a_killed_holder_is_taken_over(tmp_path):
  proc = _holder(tmp_path)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  messages = []
  with lock.DirectoryLock(str(tmp_path), log=messages.append) as held:
    assert held.took_over["pid"] == proc.pid
    assert held.took_over["host"] == socket.gethostname()
    assert len(messages) == 1
  assert not os.path.exists(tmp_path / ".lock")  # released on exit


def test_release_then_reacquire_and_in_process_refusal(tmp_path):
  first = lock.DirectoryLock(str(tmp_path)).acquire()
  with pytest.raises(lock.LockedError):  # flock is per open file: a second open is refused
    lock.DirectoryLock(str(tmp_path)).acquire()
  first.release()
  with lock.DirectoryLock(str(tmp_path)) as again:
    assert again.took_over is None  # a clean release leaves no record to take over


def test_object_store_paths_are_not_locked():
  with lock.DirectoryLock("gs://bucket/run") as held:
    assert held._fd is None
