"""Launch scripts end to end: results on success, one-line errors and no output on failure."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import make_hf_llama
from minitron_jax.io import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
  p = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args],
                     capture_output=True, text=True, timeout=600, cwd=ROOT)
  return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, real_dir):
  """A random tiny Llama with the real tokenizer files beside it."""
  _, d = make_hf_llama(tmp_path_factory.mktemp("cli") / "tiny", vocab=49152, hidden=32,
                       inter=48, heads=4, kv_heads=2, max_pos=512)
  for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "special_tokens_map.json"):
    if os.path.exists(os.path.join(real_dir, f)):
      shutil.copy(os.path.join(real_dir, f), d)
  return d


def test_evaluate_writes_table_and_json(tiny_dir, data_root, tmp_path):
  out = tmp_path / "res" / "eval.json"
  rc, stdout, stderr = run("evaluate.py", f"--model_dir={tiny_dir}", "--tasks=ppl,piqa,lambada",
                           f"--data_root={data_root}", "--limit=4", "--seq_len=64",
                           "--max_windows=2", f"--output_json={out}")
  assert rc == 0, stderr
  res = files.read_json(out)["results"]
  assert res["ppl"]["windows"] == 2 and res["ppl"]["tokens"] == 126
  assert res["piqa"]["examples"] == 4 and 0 <= res["piqa"]["acc_norm"] <= 1
  assert "lambada" in stdout and "acc_norm" in stdout


def test_generate_runs_with_chat_template(tiny_dir):
  rc, stdout, stderr = run("generate.py", f"--model_dir={tiny_dir}", "--chat", "--prompt=hi",
                           "--prompt=a longer second prompt", "--max_new_tokens=5")
  assert rc == 0, stderr
  assert stdout.count("### ") == 2 and "tokens/s" in stderr


@pytest.mark.parametrize("script,args,culprit", [
    ("evaluate.py", ["--tasks=ppl,nosuchtask"], "nosuchtask"),
    ("evaluate.py", ["--model_dir=/nonexistent/model"], "/nonexistent/model"),
    ("evaluate.py", ["--ppl_file=/nonexistent.txt", "--tasks=ppl"], "/nonexistent.txt"),
    ("evaluate.py", ["--seq_len=1"], "seq_len"),
    ("generate.py", ["--max_new_tokens=0"], "max_new_tokens"),
    ("generate.py", ["--top_p=1.5"], "top_p"),
    ("generate.py", ["--dtype=int3"], "dtype"),
])
def test_bad_input_is_one_line_error(tiny_dir, tmp_path, script, args, culprit):
  if not any(a.startswith("--model_dir") for a in args):
    args = [f"--model_dir={tiny_dir}", *args]
  out = tmp_path / "out.json"
  extra = [f"--output_json={out}"] if script == "evaluate.py" else []
  rc, _, stderr = run(script, *args, *extra)
  assert rc != 0
  lines = [l for l in stderr.strip().splitlines() if l.strip()]
  # Our one-line report (or absl's for a flag's own bound); a backend may log its own probing
  # before it (libtpu on a CPU host).
  first_error = next(l for l in lines if l.startswith(("error: ", "FATAL Flags parsing error")))
  assert culprit in first_error, stderr
  assert "Traceback" not in stderr
  assert not out.exists()


def test_unsupported_architecture_via_cli(tiny_dir, tmp_path):
  d = tmp_path / "m"
  shutil.copytree(tiny_dir, d)
  cfg = files.read_json(d / "config.json")
  cfg["model_type"] = "gpt_neox"
  json.dump(cfg, open(d / "config.json", "w"))
  rc, _, stderr = run("generate.py", f"--model_dir={d}")
  assert rc == 1 and "model_type 'gpt_neox'" in stderr and "Traceback" not in stderr


def _blocking_env(tmp_path, module):
  """Environment whose interpreter cannot import `module` (as if it were not installed)."""
  site = tmp_path / "block"
  site.mkdir()
  (site / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
  return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), ROOT])}


def test_missing_package_is_named_with_its_install_command(tiny_dir, tmp_path):
  text = tmp_path / "calib.txt"
  text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
  out = tmp_path / "pruned"
  p = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "prune.py"),
                      f"--model_dir={tiny_dir}", f"--output_dir={out}", "--hidden_size=16",
                      f"--calib_data={text}", "--calib_samples=4", "--calib_seq_len=32",
                      "--eval_samples=0", "--batch_size=4"],
                     capture_output=True, text=True, timeout=600, cwd=ROOT,
                     env=_blocking_env(tmp_path, "matplotlib"))
  assert p.returncode == 1, p.stderr[-2000:]
  assert "error: the Python package 'matplotlib' is not installed; pip install matplotlib" \
      in p.stderr
  assert "Traceback" not in p.stderr
  assert not out.exists()  # the atomic output directory never appeared


def test_missing_package_message_leaves_our_own_modules_to_tracebacks():
  from minitron_jax import cli

  torch = ModuleNotFoundError("No module named 'torch'", name="torch")
  assert "torch==2.13.0" in cli.missing_package_message(torch)
  ours = ModuleNotFoundError("x", name="minitron_jax.nothing")
  assert cli.missing_package_message(ours) is None


def test_recipe_with_unreachable_teacher_fails_before_any_stage_is_marked(tmp_path, data_root):
  run_dir = tmp_path / "run"
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
  p = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "minitron.py"),
                      f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
                      "--config.teacher=no-such-org/no-such-model",
                      f"--config.run_dir={run_dir}", f"--config.data_root={data_root}"],
                     capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
  assert p.returncode == 1, p.stderr[-2000:]
  assert "error: " in p.stderr and "no-such-org/no-such-model" in p.stderr
  assert "Traceback" not in p.stderr
  assert not (run_dir / "teacher.json").exists()
