"""A finished stage whose checksummed output was damaged after the fact is run again."""

import os

from minitron_jax.io import files
from minitron_jax.recipe import stages


def _finished_prune(run_dir):
  stage = stages.Stage("prune_width", "pruned_width/prune_report.json", run=None)
  with files.atomic_output_dir(os.path.join(run_dir, "pruned_width")) as d:
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
      f.write(os.urandom(4096))
    files.write_json(os.path.join(d, "prune_report.json"), {"ok": True})
  return stage


def test_a_truncated_weight_file_makes_its_stage_run_again(tmp_path):
  stage = _finished_prune(str(tmp_path))
  assert stages._done(str(tmp_path), stage) and stages._damaged(str(tmp_path), stage) == []
  weights = tmp_path / "pruned_width" / "model.safetensors"
  with open(weights, "r+b") as f:
    f.truncate(1000)
  damaged = stages._damaged(str(tmp_path), stage)
  assert [d for d, _ in damaged] == [str(tmp_path / "pruned_width")]
  assert str(weights) in damaged[0][1][0]
  stages._repair(str(tmp_path), stage, stages._damaged(str(tmp_path), stage))
  assert not stages._done(str(tmp_path), stage)  # the stage will run again
  assert not (tmp_path / "pruned_width").exists()


def test_an_intact_stage_is_left_alone(tmp_path):
  stage = _finished_prune(str(tmp_path))
  stages._repair(str(tmp_path), stage, stages._damaged(str(tmp_path), stage))
  assert stages._done(str(tmp_path), stage)
  assert files.verify_checksums(str(tmp_path / "pruned_width")) == []


def test_a_damaged_export_inside_a_training_stage_removes_its_marker(tmp_path):
  stage = stages.Stage("distill_width", "distill_width/run.json", run=None)
  with files.atomic_output_dir(str(tmp_path / "distill_width" / "hf")) as d:
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
      f.write(b"x" * 100)
  files.write_json(str(tmp_path / "distill_width" / "run.json"), {"steps": 4})
  (tmp_path / "distill_width" / "hf" / "model.safetensors").write_bytes(b"y" * 100)
  stages._repair(str(tmp_path), stage, stages._damaged(str(tmp_path), stage))
  assert not (tmp_path / "distill_width" / "run.json").exists()
  assert not (tmp_path / "distill_width" / "hf").exists()
