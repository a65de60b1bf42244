"""Crash safety: the tiny recipe, killed with SIGKILL at random moments inside its stages and
resumed after each kill, ends with the same results as an uninterrupted run, and no kill leaves
a half-written output behind.

The kill moments are drawn from a seed: a stage and a fraction of that stage's duration in the
uninterrupted run, counted from the moment the stage starts (again) in the resumed run. CI runs
`CRASH_KILLS` (default 3: a prune, a distillation and the evaluate/report end); the full soak is

  MINITRON_JAX_CRASH_KILLS=50 python -m pytest -q tests/recipe/test_crash.py
"""

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from minitron_jax.io import files

from helpers import recipe_command as command

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("MINITRON_JAX_CRASH_KILLS", "3"))
SEED = int(os.environ.get("MINITRON_JAX_CRASH_SEED", "0"))
STAGE_LINE = re.compile(r"^\[(\w+)\] (running|done already|finished)")
# Report fields that measure the machine (time, speed, memory), not the computation.
TIMING_KEYS = re.compile(r"(second|tokens_per_s|per_second|peak|rss|time|_s$)")


def _reader(proc, lines):
  for line in proc.stdout:
    lines.put(line)
  lines.put(None)


def _killed_once(cmd, stage, fraction, durations, order, run_dir, timeout=1800):
  """Runs `cmd` and SIGKILLs its process group `fraction` of `stage`'s reference duration after
  `stage` (or, when it is already done, the first later stage) starts. Instead of a number,
  `fraction` may name an event inside `stage`: "checkpoint" (its first checkpoint is on disk)
  or a text the stage prints when it gets there ("line:calibration data"). Returns the stage
  that was running when the kill landed, or None when the run finished first."""
  ckpt = os.path.join(run_dir, stage, "checkpoints")
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
  lines: queue.Queue = queue.Queue()
  threading.Thread(target=_reader, args=(proc, lines), daemon=True).start()
  current, kill_at, deadline = None, None, time.time() + timeout
  while time.time() < deadline:
    if fraction == "checkpoint" and current == stage and os.path.isdir(ckpt) and any(
        n.isdigit() for n in os.listdir(ckpt)):
      kill_at = time.time()
    if kill_at is not None and time.time() >= kill_at:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait(timeout=60)
      return current
    try:
      line = lines.get(timeout=0.02)
    except queue.Empty:
      continue
    if line is None:  # the run ended before the kill
      proc.wait(timeout=60)
      assert proc.returncode == 0, f"the run failed instead of being killed (exit {proc.returncode})"
      return None
    if (isinstance(fraction, str) and fraction.startswith("line:") and current == stage
        and fraction[5:] in line):
      kill_at = time.time()
    m = STAGE_LINE.match(line)
    if m and m.group(2) == "running":
      current = m.group(1)
      if (kill_at is None and not isinstance(fraction, str)
          and order.index(current) >= order.index(stage)):
        kill_at = time.time() + fraction * durations[current]
  os.killpg(proc.pid, signal.SIGKILL)
  raise AssertionError(f"no kill within {timeout}s")


def half_written(run_dir) -> list[str]:
  """Outputs a kill must never leave: a checksummed directory whose files differ from their
  checksums, or a JSON file that does not parse (temporary names are not outputs)."""
  bad = []
  for dirpath, dirs, names in os.walk(run_dir):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    if files.CHECKSUMS in names:
      bad += files.verify_checksums(dirpath)
    for n in names:
      if n.endswith(".json") and not n.startswith("."):
        try:
          files.read_json(os.path.join(dirpath, n))
        except (ValueError, UnicodeDecodeError) as e:
          bad.append(f"{os.path.join(dirpath, n)}: {e}")
  return bad


def results(run_dir):
  """(report numbers without timings, paths relative to the run, checksums of the weight files
  of every exported directory)."""
  def strip(x):
    if isinstance(x, dict):
      return {k: strip(v) for k, v in x.items() if not TIMING_KEYS.search(k)}
    if isinstance(x, list):
      return [strip(v) for v in x]
    return x.replace(str(run_dir), "<run>") if isinstance(x, str) else x

  report = strip(files.read_json(os.path.join(run_dir, "report.json"))["models"])
  sums = {}
  for dirpath, dirs, names in os.walk(run_dir):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    if files.CHECKSUMS in names:
      with open(os.path.join(dirpath, files.CHECKSUMS)) as f:  # reports hold times: weights only
        sums[os.path.relpath(dirpath, run_dir)] = [
            line for line in f if line.rstrip().endswith((".safetensors", ".gguf"))]
  return report, sums


def draw_kills(n, order, seed):
  """`n` (stage, fraction) pairs in run order: stages spread over every stage of the run."""
  rng = np.random.default_rng(seed)
  stages = [order[i % len(order)] for i in range(n)] if n >= len(order) else list(
      rng.choice(order, size=n, replace=False))
  kills = [(s, float(rng.uniform(0.05, 0.95))) for s in stages]
  return sorted(kills, key=lambda k: (order.index(k[0]), k[1]))


def check_report(run_dir, steps):
  """What every finished tiny run holds: every model evaluated, the report, its plots."""
  report = (run_dir / "report.md").read_text()
  evals = files.read_json(str(run_dir / "report.json"))["models"]
  names = [e["name"] for e in evals]
  assert names == ["teacher", "corrected", "pruned_width", "distill_width", "pruned_depth",
                   "distill_depth", "baseline_pruned_ce", "baseline_random_ce",
                   "quantized/fp8_channel", "quantized/int8", "quantized/int4",
                   "quantized/gguf_q8_0", "quantized/gguf_q4_0"]
  table = [line for line in report.splitlines() if line.startswith("| ")]
  assert len(table) >= 1 + len(names)
  assert not any("–" in line for line in table[:1 + len(names)]), table
  for e in evals:
    assert e["size_bytes"] > 0 and e["params"] > 0 and e["decode_tokens_per_second"] > 0
  assert "## What wins" in report and "loss_curves.png" in report
  assert (run_dir / "loss_curves.png").is_file() and (run_dir / "layer_importance.png").is_file()
  times = files.read_json(str(run_dir / "stage_times.json"))
  assert {"fetch", "data", "prune_width", "teacher_logits", "evaluate", "report"} <= set(times)
  cache = files.read_json(str(run_dir / "teacher_logits" / "run.json"))
  assert cache["k"] == 16 and cache["steps"] == steps
  # Every stage runs in a process of its own; the one that orders them holds no model, so the
  # whole run's peak is its hungriest stage's.
  stage_peaks = [v["peak_rss_gib"] for k, v in times.items() if k != "orchestrator"]
  assert times["orchestrator"]["peak_rss_gib"] < min(
      times[s]["peak_rss_gib"] for s in ("teacher_correction", "distill_width", "evaluate"))
  assert max(stage_peaks) > times["orchestrator"]["peak_rss_gib"]
  return times


def test_random_kills_resume_to_the_same_results(tiny_teacher, data_root, tmp_path):
  """The tiny recipe killed `KILLS` times (CI: in a prune's calibration, right after the first
  checkpoint of a distillation, and half-way through the evaluation) and resumed each time ends with an
  uninterrupted run's report numbers and export bytes; no kill leaves a half-written output;
  the resumed distillation restarts from its checkpoint; a run of a finished recipe runs no
  stage."""
  steps = 8
  extra = (f"--config.distill.steps={steps}", "--config.distill.save_every=2")
  ref_dir = tmp_path / "reference"
  p = subprocess.run(command(tiny_teacher, ref_dir, data_root, *extra), cwd=ROOT,
                     capture_output=True, text=True, timeout=1800)
  assert p.returncode == 0, p.stderr[-3000:]
  times = check_report(ref_dir, steps)
  order = [s for s in times if s != "orchestrator"]
  durations = {s: times[s]["seconds"] for s in order}

  run_dir = tmp_path / "killed"
  cmd = command(tiny_teacher, run_dir, data_root, *extra)
  # CI's three kills wait for events, not times, so a slower or faster machine still lands
  # them inside their stages: calibration under way, a checkpoint just committed, some models
  # evaluated and others not.
  kills = (draw_kills(KILLS, order, SEED) if KILLS != 3 else
           [("prune_width", "line:calibration data"), ("distill_width", "checkpoint"),
            ("evaluate", "line:[evaluate] pruned_depth")])
  hits = []
  for stage, fraction in kills:
    hits.append(_killed_once(cmd, stage, fraction, durations, order, str(run_dir)))
    assert half_written(run_dir) == [], (stage, fraction)
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert p.returncode == 0, p.stderr[-3000:]
  landed = [h for h in hits if h is not None]
  print(f"\n{len(landed)} of {len(kills)} kills landed, in stages: "
        + json.dumps({s: landed.count(s) for s in dict.fromkeys(landed)}))
  if KILLS == 3:
    assert landed == ["prune_width", "distill_width", "evaluate"], landed
    assert files.read_json(str(run_dir / "distill_width" / "run.json"))["resumed_from"]
  assert len(landed) >= max(1, len(kills) * 3 // 4)
  assert half_written(run_dir) == []
  check_report(run_dir, steps)
  ref_report, ref_sums = results(ref_dir)
  report, sums = results(run_dir)
  assert report == ref_report
  assert sums == ref_sums  # every export byte for byte
  def stage_times():  # the stages' own entries (the orchestrator's is rewritten by every run)
    return {k: v for k, v in files.read_json(str(run_dir / "stage_times.json")).items()
            if k != "orchestrator"}

  before, listing = stage_times(), sorted(os.listdir(run_dir))
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert stage_times() == before and sorted(os.listdir(run_dir)) == listing  # nothing ran
