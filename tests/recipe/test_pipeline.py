"""The whole recipe end to end on a tiny random teacher: every stage, the report, resuming."""

import os
import signal
import subprocess
import time

import pytest

from helpers import recipe_command
from minitron_jax.io import files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


command = recipe_command


def test_tiny_recipe_end_to_end_resumes_after_a_kill(tiny_teacher, data_root, tmp_path):
  """The whole recipe, killed (SIGKILL) in the middle of the first student's distillation and
  run again: the finished stages are not redone, the distillation resumes from its checkpoint,
  and the report has every model."""
  run_dir = tmp_path / "run"
  cmd = command(tiny_teacher, run_dir, data_root, "--config.distill.steps=24",
                "--config.distill.save_every=4")
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
  ckpt = run_dir / "distill_width" / "checkpoints"
  deadline = time.time() + 900
  while time.time() < deadline and proc.poll() is None:
    if ckpt.is_dir() and any(n.isdigit() for n in os.listdir(ckpt)):
      os.killpg(proc.pid, signal.SIGKILL)
      break
    time.sleep(0.05)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"
  assert not (run_dir / "distill_width" / "run.json").exists()

  p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
  assert p.returncode == 0, p.stderr[-3000:]
  for stage in ("fetch", "teacher_correction", "prune_width", "prune_depth", "teacher_logits"):
    assert f"[{stage}] done already" in p.stdout, stage
  assert "[distill_width] running" in p.stdout
  summary = files.read_json(run_dir / "distill_width" / "run.json")
  assert summary["resumed_from"] and summary["steps"] == 24
  report = (run_dir / "report.md").read_text()
  evals = files.read_json(run_dir / "report.json")["models"]
  names = [e["name"] for e in evals]
  assert names == ["teacher", "corrected", "pruned_width", "distill_width", "pruned_depth",
                   "distill_depth", "baseline_pruned_ce", "baseline_random_ce",
                   "quantized/fp8_channel", "quantized/int8", "quantized/int4",
                   "quantized/gguf_q8_0",
                   "quantized/gguf_q4_0"]
  table = [l for l in report.splitlines() if l.startswith("| ")]
  assert len(table) >= 1 + len(names)
  assert not any("–" in l for l in table[:1 + len(names)]), table
  for e in evals:
    assert e["size_bytes"] > 0 and e["params"] > 0 and e["decode_tokens_per_second"] > 0
  assert "## What wins" in report and "loss_curves.png" in report
  assert (run_dir / "loss_curves.png").is_file() and (run_dir / "layer_importance.png").is_file()
  times = files.read_json(run_dir / "stage_times.json")
  assert {"fetch", "data", "prune_width", "teacher_logits", "evaluate", "report"} <= set(times)
  cache = files.read_json(run_dir / "teacher_logits" / "run.json")
  assert cache["k"] == 16 and cache["steps"] == 24
  # Both students read the one cached teacher pass (the width student again, resumed).
  assert p.stdout.count("reading the teacher's top-16 logits") == 2, p.stdout[-3000:]
  # Every stage runs in a process of its own; the one that orders them holds no model, so the
  # whole run's peak is its hungriest stage's.
  stage_peaks = [v["peak_rss_gib"] for k, v in times.items() if k != "orchestrator"]
  assert times["orchestrator"]["peak_rss_gib"] < min(
      times[s]["peak_rss_gib"] for s in ("teacher_correction", "distill_width", "evaluate"))
  assert max(stage_peaks) > times["orchestrator"]["peak_rss_gib"]
  # A third run finds every stage done.
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert p.returncode == 0 and "running" not in p.stdout.replace("run directory", "")


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
  assert "[prune_width] running" in p.stdout and "[prune_width] finished" not in p.stdout
  assert not (run_dir / "pruned_width" / "prune_report.json").exists()
  assert "prune_width" not in files.read_json(run_dir / "stage_times.json")


def test_mismatched_data_weights_are_refused_before_any_work(tiny_teacher, data_root, tmp_path):
  p = subprocess.run(command(tiny_teacher, tmp_path / "run", data_root,
                             "--config.data.source=('wikitext2','shakespeare')",
                             "--config.data.weights=(1.0,)"),
                     capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert p.returncode == 1 and "data.weights" in p.stderr and "Traceback" not in p.stderr
  assert "running" not in p.stdout and not (tmp_path / "run" / "teacher.json").exists()
