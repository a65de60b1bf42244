"""A damaged latest checkpoint falls back to the one before, with a warning naming what broke."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax.io import checkpoint


def _save_two(directory):
  with checkpoint.Checkpointer(directory, async_save=False) as ckpt:
    for step in (1, 2):
      state = {"w": jnp.full((64, 64), float(step)), "step": jnp.asarray(step)}
      ckpt.save(step, state, {"step": step})
  return os.path.join(directory, "2", "state")


def _data_files(root):
  """The array data files (OCDBT `d/` folders: the process's shard and the merged root)."""
  out = []
  for dirpath, _, names in os.walk(root):
    if os.path.basename(dirpath) == "d":
      out += [os.path.join(dirpath, n) for n in names]
  return out


def _truncate(state_dir):
  for path in _data_files(state_dir):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _remove_shard(state_dir):
  for d in {os.path.dirname(p) for p in _data_files(state_dir)}:
    shutil.rmtree(d)


@pytest.mark.parametrize("damage", [_truncate, _remove_shard])
def test_damaged_latest_falls_back_to_the_previous(tmp_path, damage):
  state_dir = _save_two(str(tmp_path / "ckpt"))
  assert _data_files(state_dir), "the test must damage real array data"
  damage(state_dir)
  warnings = []
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  step, state, meta = ckpt.restore_latest(None, log=warnings.append)
  assert step == 1 and meta == {"step": 1}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.ones((64, 64)))
  assert len(warnings) == 1 and "step 2" in warnings[0]
  assert ckpt.all_steps() == [1]  # the damaged one is gone: step 2 can be saved again
  ckpt.close()


def test_intact_checkpoints_restore_the_latest(tmp_path):
  _save_two(str(tmp_path / "ckpt"))
  warnings = []
  with checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=False) as ckpt:
    step, state, _ = ckpt.restore_latest(None, log=warnings.append)
  assert step == 2 and float(state["w"][0, 0]) == 2.0 and not warnings


def test_no_checkpoint_means_a_fresh_start(tmp_path):
  with checkpoint.Checkpointer(str(tmp_path / "empty"), async_save=False) as ckpt:
    assert ckpt.restore_latest(None) == (None, None, None)
