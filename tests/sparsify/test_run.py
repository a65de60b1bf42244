"""SparsifyJob end to end on a small random model, its settings, the launch script and the
recipe stage built from the config."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import base
from minitron_jax.io import hf as hf_io
from minitron_jax.recipe import jobs, stages
from minitron_jax.settings import SettingError
from minitron_jax.sparsify import apply
from minitron_jax.sparsify import run as sparsify_run
from minitron_jax.sparsify.methods import Pattern

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 +
        "A sparse model keeps two of every four weights. " * 40)


def test_sparsegpt_run_writes_a_2_4_checkpoint_with_its_report(tmp_path):
  import torch
  import transformers

  from helpers import torch_logits
  from minitron_jax import model as M

  text = tmp_path / "calib.txt"
  text.write_text(TEXT)
  out = tmp_path / "out"
  job = sparsify_run.SparsifyJob(
      model_dir="smollm2-tiny-random", output_dir=str(out), method="sparsegpt", pattern="2:4",
      calib=dataclasses.replace(sparsify_run.SparsifyJob.calib, data=str(text), samples=4,
                                seq_len=64),
      dense_dtype="float32", ppl_file=str(text), seq_len=64, max_windows=2, progress=False)
  report = sparsify_run.run(job)
  assert report["sparsity"]["sparsity"] == 0.5 and report["pattern"] == "2:4"
  assert report["perplexity"]["after"] > 0
  saved = json.loads((out / sparsify_run.REPORT_FILE).read_text())
  assert saved["method"] == "sparsegpt"
  params, cfg = hf_io.load_hf(out)[:2]
  apply.sparsity_stats(params, cfg, Pattern.parse("2:4"))  # raises if a group has > 2
  tokens = np.random.default_rng(0).integers(3, 1000, (1, 12))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  ours = np.asarray(M.forward(params, cfg, tokens)["logits"])
  np.testing.assert_allclose(torch_logits(hf, tokens), ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fields,name", [
    (dict(method="obs"), "method"),
    (dict(pattern="3:2"), "pattern"),
    (dict(pattern="unstructured", sparsity=1.5), "sparsity"),
    (dict(pattern="4:8", export="sparse24"), "export"),
    (dict(export="sparse8"), "export"),
    (dict(method="magnitude", calib=sparsify_run.SparsifyJob.calib.__class__(data="x")),
     "calib.data"),
    (dict(method="wanda"), "calib.data"),
    (dict(method="magnitude", damp=-1.0), "damp"),
])
def test_bad_settings_are_refused_by_name(tmp_path, fields, name):
  job = sparsify_run.SparsifyJob(model_dir="m", output_dir=str(tmp_path / "o"), **fields)
  with pytest.raises(SettingError) as e:
    job.validate()
  assert e.value.field == name


def test_launch_script_defaults_and_one_line_errors(tmp_path):
  code = ("import json, runpy; from absl import flags; "
          f"runpy.run_path({os.path.join(ROOT, 'launch', 'sparsify.py')!r}, run_name='x'); "
          "print(json.dumps({n: flags.FLAGS[n].default for n in flags.FLAGS}, default=str))")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                     cwd=ROOT)
  got = json.loads(p.stdout.strip().splitlines()[-1])
  job = sparsify_run.SparsifyJob(model_dir="m", output_dir="o")
  for name in ("method", "pattern", "sparsity", "export", "damp", "block_size", "dense_dtype",
               "seq_len", "max_windows", "overwrite"):
    assert got[name] == getattr(job, name), name
  assert (got["calib_samples"], got["calib_seq_len"]) == (job.calib.samples, job.calib.seq_len)
  p = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sparsify.py"),
                      "--model_dir=/nonexistent", f"--output_dir={tmp_path / 'o'}",
                      "--pattern=4:8", "--export=sparse24"],
                     capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert p.returncode == 1
  assert p.stderr.strip().splitlines()[-1].startswith("error: --export: sparse24 stores 2:4")


def test_recipe_stage_is_off_by_default_and_built_from_the_config(tmp_path):
  cfg = base.get_config()
  assert "sparse" not in stages.evaluated_models(cfg)
  cfg.sparsify.pattern = "2:4"
  assert stages.evaluated_models(cfg)[-1] == "sparse"
  job = jobs.sparsify_job(cfg, str(tmp_path))
  assert job.model_dir == os.path.join(str(tmp_path), "distill_depth", "hf")
  assert job.calib.data == os.path.join(str(tmp_path), "data", "blend.json")
  assert (job.method, job.export, job.calib.samples) == ("sparsegpt", "dense", 64)
  cfg.sparsify.source = "nowhere"
  with pytest.raises(SettingError, match="sparsify.source='nowhere'"):
    jobs.check_recipe(cfg)
  cfg.sparsify.source = "distill_depth"
  cfg.sparsify.method = "obs"
  with pytest.raises(SettingError, match="^sparsify.method='obs'"):
    jobs.validate(cfg, str(tmp_path), ["sparsify"])
