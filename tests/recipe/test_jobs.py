"""Every stage's job built from the recipe config (recipe/jobs.py): one default per setting,
validated before the first stage runs, errors named in the caller's words."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from configs import base, tiny
from minitron_jax.evaluate import run as eval_run
from minitron_jax.prune import run as prune_run
from minitron_jax.prune import search as search_space
from minitron_jax.quantize import run as quantize_run
from minitron_jax.recipe import jobs, search, stages
from minitron_jax.settings import SettingError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _launch(script, *args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)


def _flag_defaults(script) -> dict:
  """{flag: default} of a launch script, read by importing it in a fresh interpreter (its flags
  would clash with another script's in this one)."""
  code = ("import json, runpy; from absl import flags; "
          f"runpy.run_path({os.path.join(ROOT, 'launch', script)!r}, run_name='defaults'); "
          "print(json.dumps({n: flags.FLAGS[n].default for n in flags.FLAGS}, default=str))")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                     cwd=ROOT)
  assert p.returncode == 0, p.stderr[-2000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


def _field_defaults(cls) -> dict:
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.default is not dataclasses.MISSING}


def test_prune_flag_defaults_are_the_jobs():
  got = _flag_defaults("prune.py")
  prune, srch = _field_defaults(prune_run.PruneJob), _field_defaults(search.SearchJob)
  budget = _field_defaults(search_space.Budget)
  calib = prune["calib"]
  want = {"calib_data": calib.data, "calib_samples": calib.samples,
          "calib_seq_len": calib.seq_len, "batch_size": calib.batch_size, "seed": calib.seed,
          "mesh": prune["mesh"].spec, "export_dtype": budget["dtype"],
          "budget_slack": budget["slack"], "width_multiple": budget["multiple"],
          "search_top_k": srch["top_k"], "search_teacher_topk": srch["teacher_topk"],
          "search_task": srch["score_task"], "search_task_limit": srch["task_limit"]}
  for name in ("importance", "aggregation", "layer_importance", "eval_samples", "layer_task",
               "layer_task_limit", "layer_batches", "data_root", "scores_npz", "overwrite",
               "dtype"):
    want[name] = prune[name]
  for name in ("max_candidates", "search_steps", "search_batch_size", "search_lr", "dry_run"):
    want[name] = srch[name]
  for name in ("target_params", "target_memory_gb", "kv_tokens", "max_width_cut",
               "max_depth_cut"):
    want[name] = budget[name]
  assert {k: got[k] for k in want} == want
  # The settings a prune and a search share have one default, so the shared flags fit both.
  for name in ("calib", "eval_samples", "importance", "aggregation", "scores_npz", "dtype"):
    assert srch[name] == prune[name], name


def test_quantize_and_evaluate_flag_defaults_are_the_jobs():
  got = _flag_defaults("quantize.py")
  q = _field_defaults(quantize_run.QuantizeJob)
  want = {"calib_data": q["calib"].data or None, "calib_samples": q["calib"].samples,
          "calib_seq_len": q["calib"].seq_len, "mesh": q["mesh"].spec}
  for name in ("overwrite", "ppl_file", "seq_len", "max_windows", "group_size",
               "include_embeddings", "calibration_file", "calibration_windows",
               "unquantized_dtype", "gguf_tokenizer_pre", "method", "gptq_damp", "act_order"):
    want[name] = q[name]
  assert {k: got[k] for k in want} == want
  got = _flag_defaults("evaluate.py")
  e = _field_defaults(eval_run.EvalJob)
  want = {"tasks": list(e["tasks"]), "mesh": e["mesh"].spec,
          "harness_tasks": list(e["harness_tasks"])}
  for name in ("data_root", "ppl_file", "seq_len", "max_windows", "limit", "batch_size",
               "dtype", "output_json", "protocol", "num_fewshot", "mmlu_only_ok",
               "mmlu_per_subject", "harness_include_path", "qa_task"):
    want[name] = e[name]
  assert {k: got[k] for k in want} == want


def test_launch_names_the_flag_and_the_recipe_the_config_key(tmp_path):
  """The same bad setting (zero calibration windows), named in each caller's words."""
  p = _launch("prune.py", "--model_dir=/nonexistent", f"--output_dir={tmp_path / 'out'}",
              "--hidden_size=64", "--calib_samples=0")
  assert p.returncode == 1, p.stderr[-2000:]
  assert p.stderr.strip().splitlines()[-1] == "error: --calib_samples=0 must be an integer >= 1"
  cfg = tiny.get_config()
  cfg.run_dir = str(tmp_path / "run")
  cfg.prune.calib_samples = 0
  with pytest.raises(SettingError) as e:
    stages.run(cfg)
  assert str(e.value) == "prune.calib_samples=0 must be an integer >= 1"
  assert not (tmp_path / "run").exists()
  p = _launch("quantize.py", "--model_dir=/nonexistent", f"--output_dir={tmp_path / 'q'}",
              "--format=int4", "--method=gptq", "--calib_data=shakespeare", "--calib_samples=0",
              "--ppl_file=none")
  assert p.returncode == 1, p.stderr[-2000:]
  assert p.stderr.strip().splitlines()[-1] == "error: --calib_samples=0 must be an integer >= 1"


@pytest.mark.parametrize("key,value,name", [
    ("quantize.formats", ("int8", "int3"), "quantize.formats"),
    ("eval.seq_len", 1, "eval.seq_len"),
    ("prune.search.top_k", 0, "prune.search.top_k"),
    ("prune.search.export_dtype", "int3", "prune.search.export_dtype"),
    ("mesh", "data:x", "mesh"),
])
def test_a_late_stages_bad_setting_is_refused_before_the_first_stage(tmp_path, key, value, name):
  cfg = tiny.get_config()
  cfg.run_dir = str(tmp_path / "run")
  cfg.prune.search.enabled = True
  section, _, leaf = key.rpartition(".")
  node = cfg
  for part in filter(None, section.split(".")):
    node = node[part]
  node[leaf] = value
  with pytest.raises(SettingError) as e:
    stages.run(cfg)
  assert str(e.value).startswith(f"{name}=") or str(e.value).startswith(f"{name}:")
  assert not (tmp_path / "run" / "teacher.json").exists()


def test_every_stage_job_comes_from_the_config(tmp_path):
  cfg = base.get_config()
  run_dir = str(tmp_path)
  width = jobs.prune_job(cfg, run_dir, "width")
  assert (width.hidden_size, width.intermediate_size) == (576, 480)
  assert width.calib.samples == cfg.prune.calib_samples and width.calib.seed == cfg.seed
  assert width.calib.data == os.path.join(run_dir, "data", "blend.json")
  assert width.model_dir == os.path.join(run_dir, "corrected", "hf")  # corrected teacher
  assert jobs.prune_job(cfg, run_dir, "depth").num_hidden_layers == 15
  s = jobs.search_job(cfg, run_dir)
  assert s.budget.target_params == cfg.prune.search.target_params and s.budget.dtype == "bfloat16"
  assert (s.top_k, s.teacher_topk, s.search_lr) == (2, 64, cfg.distill.lr)
  (q,) = jobs.quantize_jobs(cfg, run_dir)
  assert q.format == "gguf_q4_0" and q.model_dir == os.path.join(run_dir, "distill_depth", "hf")
  cfg.correction.steps = 0  # before the fetch stage, the teacher is the one the config names
  assert jobs.prune_job(cfg, run_dir, "width").model_dir == cfg.teacher
  ev = jobs.eval_job(cfg, "m", cfg.eval.tasks)
  assert (ev.seq_len, ev.max_windows, ev.limit) == (512, 8, 100)
  assert ev.mesh.stage_mesh() is None  # data:-1: forward-only stages run unsharded


def test_gemma3_recipe_validates_and_its_quantized_student_exports_to_gguf(tmp_path):
  from configs import gemma3_270m
  from minitron_jax import config as C
  from minitron_jax.prune.slicing import Targets
  from minitron_jax.quantize import gguf_export

  cfg = gemma3_270m.get_config()
  run_dir = str(tmp_path)
  jobs.validate(cfg, run_dir, [s.name for s in stages.stages() if s.enabled(cfg)])
  (q,) = jobs.quantize_jobs(cfg, run_dir)
  assert q.format == "gguf_q8_0" and q.model_dir == os.path.join(run_dir, "distill_width", "hf")
  teacher = C.preset("gemma3-270m")
  width = Targets.from_flags(teacher, **dict(cfg.prune.width)).validate(teacher)
  gguf_export.check_architecture(width)  # llama.cpp's Gemma 3 runs the width student
  assert width.hidden_size % 32 == 0 and width.intermediate_size % 32 == 0  # Q8_0 blocks
