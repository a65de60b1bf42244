"""GGUF exports run in real llama.cpp (the CPU library of `llama-cpp-cffi`, see tests/llamacpp.py).

The tiny random SmolLM2 (`smollm2-tiny-random`: SmolLM2's real tokenizer, hidden 128, 4 layers)
is quantized and exported as llama.cpp reads it; llama.cpp must tokenize prompts as the HF
tokenizer does and compute the logits of our quantized forward. llama.cpp also rounds the
activations of a Q8_0 / Q4_0 product to Q8_0 blocks and those of the F16 output matrix to F16,
which our forward does not: the tolerance covers that, measured below.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import llamacpp
from minitron_jax import model as M
from minitron_jax.io import hf as hf_io
from minitron_jax.io import registry
from minitron_jax.quantize import export as quant_export
from minitron_jax.quantize import formats as Q
from minitron_jax.quantize import gguf_export

PROMPTS = ["The quick brown fox jumps over 13 lazy dogs, doesn't it?",
           "Quantization maps params to params; 12345 + 678 = 13023.\n\n  Indented\tline",
           "Ünïcödé — 日本語のテキスト 🦙 <|im_start|>user"]
# |llama.cpp - ours| / max|ours| over the first prompt's logits, measured: Q8_0 1.1e-2, Q4_0
# 1.1e-2, flat over positions (a RoPE or q/k layout error grows with position and reaches ~20 %).
# Our own Q8_0 forward is 1.1e-2 away from the float model's: llama.cpp's rounding of the
# activations is of the same order as the weights' rounding.
TOLERANCE = 2.5e-2


@pytest.fixture(scope="module")
def tiny_random():
  model_dir = str(registry.resolve_model_dir("smollm2-tiny-random"))
  params, cfg = hf_io.load_hf(model_dir)
  return model_dir, params, cfg, hf_io.load_tokenizer(model_dir)


@pytest.mark.parametrize("fmt", ["gguf_q8_0", "gguf_q4_0"])
def test_llama_export_runs_in_llama_cpp(tiny_random, tmp_path, fmt):
  llamacpp.load()  # skips here, before any work, where llama.cpp cannot run
  model_dir, params, cfg, tok = tiny_random
  fmt = Q.parse_format(fmt)
  qp = quant_export.export_params(Q.quantize_params(params, cfg, fmt), cfg, fmt, "float32")
  out = quant_export.export(qp, cfg, fmt, str(tmp_path / "gguf"), source_dir=model_dir)
  with llamacpp.LlamaCpp(f"{out}/{gguf_export.gguf_file_name(fmt)}") as llm:
    assert llm.n_vocab == cfg.vocab_size
    for text in PROMPTS:
      assert llm.tokenize(text) == tok(text)["input_ids"], text
    ids = llm.tokenize(PROMPTS[0])
    theirs = llm.logits(ids)
  ours = np.asarray(M.forward(qp, cfg, jnp.asarray([ids]))["logits"][0])
  assert np.abs(theirs - ours).max() / np.abs(ours).max() <= TOLERANCE
