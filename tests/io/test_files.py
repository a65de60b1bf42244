"""Atomic writes are durable: the file is fsynced before the rename, its directory after."""

import os

from minitron_jax.io import files


def _record(monkeypatch):
  events = []
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(fd):
    events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
    return real_fsync(fd)

  def replace(src, dst):
    events.append(("replace", os.path.realpath(dst)))
    return real_replace(src, dst)

  monkeypatch.setattr(os, "fsync", fsync)
  monkeypatch.setattr(os, "replace", replace)
  return events


def test_write_text_fsyncs_file_then_directory(tmp_path, monkeypatch):
  events = _record(monkeypatch)
  path = tmp_path / "sub" / "out.json"
  files.write_json(str(path), {"a": 1})
  kinds = [k for k, _ in events]
  assert kinds == ["fsync", "replace", "fsync"], events
  assert events[0][1].startswith(str(tmp_path / "sub" / ".tmp-"))  # the temp file's data
  assert events[1][1] == str(path)
  assert events[2][1] == str(tmp_path / "sub")  # the rename itself
  assert path.read_text() == '{\n  "a": 1\n}\n'


def test_atomic_output_dir_fsyncs_every_file_before_the_rename(tmp_path, monkeypatch):
  events = _record(monkeypatch)
  out = tmp_path / "model"
  with files.atomic_output_dir(str(out)) as d:
    with open(os.path.join(d, "a.bin"), "wb") as f:
      f.write(b"x" * 10)
    os.makedirs(os.path.join(d, "nested"))
    with open(os.path.join(d, "nested", "b.bin"), "wb") as f:
      f.write(b"y")
  rename = next(i for i, (k, p) in enumerate(events) if k == "replace" and p == str(out))
  synced = {os.path.basename(p) for k, p in events[:rename] if k == "fsync"}
  assert {"a.bin", "b.bin", "nested"} <= synced
  assert events[rename + 1:] == [("fsync", str(tmp_path))]
  assert (out / "nested" / "b.bin").read_bytes() == b"y"


def test_output_dirs_carry_checksums_that_catch_damage(tmp_path):
  out = tmp_path / "model"
  with files.atomic_output_dir(str(out)) as d:
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
      f.write(os.urandom(5000))
    os.makedirs(os.path.join(d, "sub"))
    with open(os.path.join(d, "sub", "config.json"), "w") as f:
      f.write("{}")
  lines = (out / files.CHECKSUMS).read_text().splitlines()
  assert sorted(line.split("  ")[1] for line in lines) == ["model.safetensors", "sub/config.json"]
  assert files.verify_checksums(str(out)) == []
  with open(out / "model.safetensors", "r+b") as f:  # a truncated weight file
    f.truncate(100)
  (out / "sub" / "config.json").unlink()
  problems = files.verify_checksums(str(out))
  assert len(problems) == 2
  assert problems[0].startswith(str(out / "model.safetensors"))
  assert problems[1].startswith(str(out / "sub" / "config.json"))


def test_checksums_match_sha256sum(tmp_path):
  import hashlib
  import subprocess
  import shutil

  out = tmp_path / "d"
  with files.atomic_output_dir(str(out)) as d:
    with open(os.path.join(d, "x.bin"), "wb") as f:
      f.write(b"abc")
  line = (out / files.CHECKSUMS).read_text()
  assert line == hashlib.sha256(b"abc").hexdigest() + "  x.bin\n"
  if shutil.which("sha256sum"):
    subprocess.run(["sha256sum", "-c", "--quiet", files.CHECKSUMS], cwd=out, check=True)


def test_a_directory_without_checksums_is_not_flagged(tmp_path):
  (tmp_path / "a").write_text("x")
  assert files.verify_checksums(str(tmp_path)) == []


def test_a_killed_writes_leftovers_are_removed_by_the_next_write(tmp_path):
  (tmp_path / ".model.tmp-abc").mkdir()
  (tmp_path / ".model.tmp-abc" / "half.safetensors").write_bytes(b"x")
  (tmp_path / ".other.tmp-abc").mkdir()  # another output's: not this write's business
  with files.atomic_output_dir(str(tmp_path / "model")) as d:
    with open(os.path.join(d, "a"), "w") as f:
      f.write("a")
  assert sorted(os.listdir(tmp_path)) == [".other.tmp-abc", "model"]
