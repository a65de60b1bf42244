"""Pruned checkpoints: valid HF directories, streaming equals in-memory, the CLI, and the real
teacher pruned by activation importance against random importance."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from helpers import make_hf_llama, torch_logits
from minitron_jax import model as M
from minitron_jax.io import hf_compat
from minitron_jax.io import hf as hf_io
from minitron_jax.prune import importance as I
from minitron_jax.prune import slicing
from minitron_jax.data.calib import CalibSpec
from minitron_jax.prune import run as prune_job
from minitron_jax.io.safetensors import SafetensorsFile
from minitron_jax.io import files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ODD = dict(hidden_size=448, intermediate_size=1000, num_attention_heads=6, num_key_value_heads=3,
           num_hidden_layers=20)


@pytest.mark.slow
def test_odd_target_of_real_teacher_loads_in_transformers(real_model, tmp_path):
  params, cfg, tok = real_model
  targets = slicing.Targets(**ODD)
  plan = slicing.make_plan(cfg, targets, I.random_scores(cfg, 0), layer_scores=np.arange(30.0))
  pruned, new = slicing.prune(params, cfg, plan)
  assert (new.hidden_size, new.intermediate_size, new.num_attention_heads,
          new.num_key_value_heads, new.num_hidden_layers) == tuple(ODD.values())
  out = hf_io.save_hf(pruned, new, tmp_path / "pruned")
  hf_compat.allow_explicit_head_dim()  # transformers 5 rejects hidden % heads != 0 otherwise
  ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = np.array([tok("The quick brown fox jumps over the lazy dog. " * 6)["input_ids"]])
  ours = np.asarray(M.forward(pruned, new, tokens)["logits"])
  assert np.abs(ours - torch_logits(ref, tokens)).max() <= 1e-4
  assert files.read_json(os.path.join(out, "config.json"))["head_dim"] == 64


def test_streaming_prune_equals_in_memory(tmp_path):
  _, src = make_hf_llama(tmp_path / "src", hidden=64, inter=96, heads=4, kv_heads=2, layers=3)
  params, cfg = hf_io.load_hf(src)
  plan = slicing.make_plan(cfg, slicing.Targets(hidden_size=40, intermediate_size=50, num_attention_heads=2,
                                    num_key_value_heads=1, drop_layers=(1,)),
                     I.random_scores(cfg, 1))
  pruned, new = slicing.prune(params, cfg, plan)
  mem = hf_io.save_hf(pruned, new, tmp_path / "mem")
  streamed_cfg = slicing.prune_checkpoint(src, str(tmp_path / "stream"), plan, max_shard_bytes=20_000)
  assert streamed_cfg == new
  a = SafetensorsFile(os.path.join(mem, "model.safetensors"))
  b = hf_io.open_checkpoint(tmp_path / "stream")
  assert len(set(b.values())) > 1  # really sharded
  assert sorted(a.keys()) == sorted(b)
  for name in a.keys():
    assert a.get(name).tobytes() == b[name].get(name).tobytes(), name


def _run_prune(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "prune.py"), *args],
                        capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.parametrize("args,culprit", [
    (["--hidden_size=9999"], "--hidden_size=9999"),
    (["--num_attention_heads=5"], "not a multiple"),
    (["--drop_layers=40"], "[40] out of range"),
    (["--drop_layers=3-1"], "empty range"),
    (["--aggregation=l3,mean"], "l3"),
])
def test_illegal_targets_fail_before_work_via_cli(tmp_path, real_dir, args, culprit):
  out = tmp_path / "out"
  p = _run_prune(f"--model_dir={real_dir}", f"--output_dir={out}", *args)
  assert p.returncode == 1 and culprit in p.stderr and "Traceback" not in p.stderr
  assert "importance" not in p.stderr  # failed before calibration / importance
  assert not out.exists()


@pytest.mark.slow
def test_real_teacher_activation_importance_beats_random(real_dir, tmp_path):
  common = dict(model_dir=str(real_dir), hidden_size=432, intermediate_size=896,
                calib=CalibSpec(samples=48, seq_len=256, batch_size=8), eval_samples=16)
  act = prune_job.run(prune_job.PruneJob(output_dir=str(tmp_path / "act"), **common))
  rnd = prune_job.run(prune_job.PruneJob(output_dir=str(tmp_path / "rnd"), importance="random",
                                         **common))
  print(f"held-out perplexity: teacher {act['calibration_ppl_before']:.1f}, activation "
        f"{act['calibration_ppl_after']:.1f}, random {rnd['calibration_ppl_after']:.1f}")
  assert act["calibration_ppl_after"] * 3 < rnd["calibration_ppl_after"]
  for name in ("importance.npz", "importance.png", "prune_report.json", "config.json"):
    assert os.path.isfile(tmp_path / "act" / name)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "act"))
  assert loaded.config.hidden_size == 432 and loaded.config.intermediate_size == 896
  report = files.read_json(tmp_path / "act" / "prune_report.json")
  assert len(report["kept"]["embed"]) == 432 and report["params_after"] < report["params_before"]


@pytest.mark.slow
def test_depth_pruning_by_layer_importance_cli(real_dir, tmp_path):
  out = tmp_path / "depth"
  p = _run_prune(f"--model_dir={real_dir}", f"--output_dir={out}", "--num_hidden_layers=24",
                 "--layer_importance=lm_loss", "--calib_samples=8", "--calib_seq_len=128",
                 "--eval_samples=8")
  assert p.returncode == 0, p.stderr[-2000:]
  report = files.read_json(out / "prune_report.json")
  kept = report["kept"]["layers"]
  dropped = sorted(set(range(30)) - set(kept))
  assert len(kept) == 24 and dropped == list(range(dropped[0], dropped[0] + 6))  # contiguous
  assert os.path.isfile(out / "layer_importance.png")
  losses = report["layer_importance"]["lm_loss_k6"]
  assert len(losses) == 25 and dropped[0] == int(np.argmin(losses))  # the least damaging block
  # Trials only for the dropped block size; per-layer block importance draws the picture.
  assert set(report["layer_importance"]) == {"lm_loss_k6", "block_importance_k1"}
  assert len(report["layer_importance"]["block_importance_k1"]) == 30
  # A depth-only target ranks layers only: no head/neuron/channel importance is computed.
  npz = out / "importance.npz"
  assert "importance_seconds" not in report and not os.path.isfile(out / "importance.png")
  assert "heads" not in np.load(npz) and "layer_scores" in np.load(npz)
  # Its scores prune the same layers again tensor by tensor; a width target is refused by name.
  again = tmp_path / "again"
  p = _run_prune(f"--model_dir={real_dir}", f"--output_dir={again}", "--num_hidden_layers=24",
                 f"--scores_npz={npz}")
  assert p.returncode == 0, p.stderr[-2000:]
  assert files.read_json(again / "prune_report.json")["kept"]["layers"] == kept
  p = _run_prune(f"--model_dir={real_dir}", f"--output_dir={tmp_path / 'wide'}",
                 "--hidden_size=432", f"--scores_npz={npz}")
  assert p.returncode == 1 and f"{npz} holds layer scores only" in p.stderr
  assert not (tmp_path / "wide").exists()
