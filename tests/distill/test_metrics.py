"""metrics.jsonl survives a kill mid-write: a torn last line is dropped on resume."""

import json

import pytest

from minitron_jax.distill import metrics


def test_a_torn_last_line_is_dropped_and_the_log_resumes(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.2}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
  assert metrics.read_metrics(str(path)) == rows
  log = metrics.MetricsLog(str(path), resume_step=2)  # the checkpoint the run resumes from
  log.write({"step": 3, "loss": 1.1})
  assert metrics.read_metrics(str(path)) == [rows[0], rows[1], {"step": 3, "loss": 1.1}]


def test_a_damaged_line_inside_the_log_is_an_error(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match="line 2"):
    metrics.read_metrics(str(path))
