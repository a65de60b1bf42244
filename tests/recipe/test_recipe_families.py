"""The whole tiny recipe (`configs/tiny.py`: correction, width and depth pruning, the teacher
cache, distillation, baselines, every quantized format incl. GGUF, evaluation, the report) on a
random teacher of each family, the size of the tiny recipe's Llama and with SmolLM2's
tokenizer: Qwen2 (biases, tied embeddings), Qwen3 (q/k norms), Mistral (a window shorter than
the training rows) and Gemma 3 (sliding and global layers, four norms, GeGLU).

A few minutes per family on 2 cores, so opt-in:

  MINITRON_JAX_ALL_FAMILIES=1 python -m pytest -q tests/recipe/test_recipe_families.py
"""

import math
import os
import subprocess

import gguf
import pytest
import safetensors

from helpers import make_family_teacher, recipe_command
from minitron_jax.io import files, gguf_arch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not os.environ.get("MINITRON_JAX_ALL_FAMILIES"),
    reason="minutes per family: set MINITRON_JAX_ALL_FAMILIES=1")]

MODELS = ["teacher", "corrected", "pruned_width", "distill_width", "pruned_depth",
          "distill_depth", "baseline_pruned_ce", "baseline_random_ce",
          "quantized/fp8_channel", "quantized/int8", "quantized/int4",
          "quantized/gguf_q8_0", "quantized/gguf_q4_0"]
# A tensor that only the family's switches make (q/k/v biases, q/k norms, Gemma's four norms;
# Mistral's switch is its window, in the config).
SWITCH_TENSOR = {"qwen2": "self_attn.k_proj.bias", "qwen3": "self_attn.k_norm.weight",
                 "mistral": "self_attn.o_proj.weight",
                 "gemma3_text": "pre_feedforward_layernorm.weight"}
# llama.cpp's Gemma 3 fixes its layer pattern, which a depth student loses (as in
# configs/gemma3_270m.py, the width student is quantized).
FLAGS = {"gemma3_text": ["--config.quantize.source=distill_width"]}


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma3_text"])
def test_whole_recipe_runs_on_each_family(family, real_dir, data_root, tmp_path):
  teacher = make_family_teacher(tmp_path / "teacher", family, real_dir)
  run_dir = tmp_path / "run"
  p = subprocess.run(recipe_command(teacher, run_dir, data_root, *FLAGS.get(family, [])),
                     capture_output=True, text=True, timeout=1800, cwd=ROOT)
  assert p.returncode == 0, p.stderr[-3000:]
  check_run(family, teacher, run_dir)


def check_run(family, teacher, run_dir):
  """Every model evaluated; the students keep the family's switches; GGUF under its name."""
  evals = files.read_json(str(run_dir / "report.json"))["models"]
  assert [e["name"] for e in evals] == MODELS
  for e in evals:
    assert e["params"] > 0 and e["size_bytes"] > 0 and e["decode_tokens_per_second"] > 0
    ppl = [e["results"][k]["ppl"] for k in ("ppl", "heldout_ppl")]
    assert all(math.isfinite(v) and v > 1 for v in ppl), (e["name"], ppl)
  src = files.read_json(teacher + "/config.json")
  for kind in ("width", "depth"):
    cfg = files.read_json(str(run_dir / f"distill_{kind}" / "hf" / "config.json"))
    assert cfg["model_type"] == family and cfg["architectures"] == src["architectures"]
    assert cfg.get("sliding_window") == src.get("sliding_window"), kind
    with safetensors.safe_open(str(run_dir / f"distill_{kind}" / "hf" / "model.safetensors"),
                               "numpy") as f:
      assert f"model.layers.0.{SWITCH_TENSOR[family]}" in f.keys(), kind
    # A width-pruned Gemma's export folds the teacher's embedding scale, the head still tied.
    assert cfg["tie_word_embeddings"] == src["tie_word_embeddings"], kind
  if family == "gemma3_text":  # the depth student keeps each surviving layer's kind
    kept = files.read_json(str(run_dir / "pruned_depth" / "prune_report.json"))["kept"]["layers"]
    cfg = files.read_json(str(run_dir / "distill_depth" / "hf" / "config.json"))
    assert cfg["layer_types"] == [src["layer_types"][i] for i in kept]
  for fmt in ("gguf_q8_0", "gguf_q4_0"):  # llama.cpp's architecture name (Mistral: llama)
    (path,) = (run_dir / "quantized" / fmt).glob("*.gguf")
    arch = gguf.GGUFReader(str(path)).fields["general.architecture"]
    assert bytes(arch.parts[-1]).decode() == gguf_arch.ARCHS[family].name, fmt
