"""The recipe's refusals on a tiny random teacher (bad settings, missing inputs, a failing stage).
The whole recipe end to end, killed and resumed, is tests/recipe/test_crash.py."""

import os
import subprocess

import pytest

from helpers import recipe_command
from minitron_jax.io import files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


command = recipe_command


@pytest.mark.parametrize("extra,culprit", [
    (["--config.no_such_key=1"], "no_such_key"),
    (["--config.quantize.source=nowhere"], "nowhere"),
])
def test_bad_config_is_named(tiny_teacher, data_root, tmp_path, extra, culprit):
  p = subprocess.run(command(tiny_teacher, tmp_path / "run", data_root, *extra),
                     capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert p.returncode != 0 and culprit in p.stderr and "Traceback" not in p.stderr


def test_stage_with_missing_input_is_named(tiny_teacher, data_root, tmp_path):
  run_dir = tmp_path / "run"
  p = subprocess.run(command(tiny_teacher, run_dir, data_root, "--stages=distill_width"),
                     capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert p.returncode == 1
  assert "distill_width" in p.stderr and "prune_width" in p.stderr and "missing" in p.stderr


def test_failing_stage_reports_one_error_and_marks_nothing(tiny_teacher, data_root, tmp_path):
  # A width target wider than the teacher is refused inside the prune stage, which runs in a
  # process of its own: its error must reach the user once, as one line, and stop the run
  # with nothing of that stage marked done.
  run_dir = tmp_path / "run"
  p = subprocess.run(command(tiny_teacher, run_dir, data_root, "--config.prune.kinds=('width',)",
                             "--config.prune.width.hidden_size=4096", "--config.correction.steps=0",
                             "--config.quantize.formats=()"),
                     capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert p.returncode == 1, p.stderr[-2000:]
  assert p.stderr.count("error:") == 1 and "hidden_size" in p.stderr, p.stderr[-2000:]
  assert "Traceback" not in p.stderr
  assert not (run_dir / "pruned_width" / "prune_report.json").exists()
  assert "prune_width" not in files.read_json(run_dir / "stage_times.json")


def test_mismatched_data_weights_are_refused_before_any_work(tiny_teacher, data_root, tmp_path):
  p = subprocess.run(command(tiny_teacher, tmp_path / "run", data_root,
                             "--config.data.source=('wikitext2','shakespeare')",
                             "--config.data.weights=(1.0,)"),
                     capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert p.returncode == 1 and "data.weights" in p.stderr and "Traceback" not in p.stderr
  assert not (tmp_path / "run").exists()  # refused before the first stage
