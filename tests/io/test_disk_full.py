"""A write that runs out of space stops with one line naming the file and the bytes it needed,
and leaves the last good output as it was."""

import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from minitron_jax import errors
from minitron_jax.io import files, safetensors

ROOT = Path(__file__).resolve().parents[2]

# Writes a model directory of one 64 KiB tensor through the library's writers and the entry
# points' error handling, as every stage's export does.
SAVE = textwrap.dedent("""
    import os, sys
    import numpy as np
    from minitron_jax import errors
    from minitron_jax.io import files, safetensors

    def main(argv):
      out = argv[1]
      w = np.full((128, 128), float(argv[2]), np.float32)
      with files.atomic_output_dir(out, overwrite=True) as tmp:
        safetensors.write(os.path.join(tmp, "model.safetensors"),
                          [("w", w.shape, w.dtype, lambda: w)])
        files.write_json(os.path.join(tmp, "config.json"), {"value": float(argv[2])})

    errors.main_wrapper(main)(sys.argv)
""")


def _save(out, value, limit=None):
  def limited():
    if limit is not None:  # a file-size limit, with SIGXFSZ ignored so write() gets EFBIG
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return subprocess.run([sys.executable, "-c", SAVE, str(out), str(value)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, preexec_fn=limited)


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_good_output(tmp_path):
  out = tmp_path / "model"
  assert _save(out, 1.0).returncode == 0
  good = files.read_json(str(out / "config.json"))
  p = _save(out, 2.0, limit=16 * 1024)  # the 64 KiB tensor cannot be written
  assert p.returncode == 1, p.stderr
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
  assert "model.safetensors" in lines[0], lines[0]
  needed = 128 * 128 * 4
  assert any(f"{n:,}" in lines[0] for n in range(needed, needed + 200)), lines[0]
  # The last good output is intact and verifies; no temporary directory is left behind.
  assert files.read_json(str(out / "config.json")) == good
  assert files.verify_checksums(str(out)) == []
  assert sorted(os.listdir(tmp_path)) == ["model"]


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
  import shutil
  from collections import namedtuple

  usage = namedtuple("usage", "total used free")
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
  w = np.zeros((64, 64), np.float32)
  path = tmp_path / "x.safetensors"
  with pytest.raises(errors.DiskFullError, match=r"x\.safetensors: needs 16,\d+ bytes"):
    safetensors.write(str(path), [("w", w.shape, w.dtype, lambda: w)])
  assert not path.exists()


def test_an_unwrapped_no_space_error_names_its_file(capsys):
  import errno

  def main(argv):  # e.g. a checkpoint writer's own OSError
    raise OSError(errno.ENOSPC, "No space left on device", "/run/ckpt/7/state")

  with pytest.raises(SystemExit) as e:
    errors.main_wrapper(main)([])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: /run/ckpt/7/state: ")


def test_other_os_errors_are_not_swallowed():
  def main(argv):
    raise OSError(5, "Input/output error")

  with pytest.raises(OSError):
    errors.main_wrapper(main)([])
