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


def _family(family):
  """Our tiny config of `family` with SmolLM2's vocabulary, and random params with non-trivial
  biases and norms. Gemma 3: llama.cpp's layer pattern and local RoPE base, and a pruned
  student's kept teacher embedding scale (sqrt(640), not sqrt(64)), which the export folds
  into the embedding and the final norm, the head still tied."""
  from helpers import family_config, family_params
  from minitron_jax.io import gguf_arch

  kw = dict(vocab_size=49152, bos_token_id=1, eos_token_id=2, rope_theta=1e6)
  if family == "gemma3_text":
    kw.update(num_hidden_layers=6, layer_types=tuple(gguf_arch.gemma3_layer_types(6)),
              rope_local_base_freq=1e4, query_pre_attn_scalar=16.0, sliding_window=6,
              embed_scale=640 ** 0.5)
  elif family == "qwen2":
    kw.update(sliding_window=None, layer_types=None, tie_word_embeddings=True,
              num_attention_heads=4)  # llama.cpp's qwen2: heads x head_dim == hidden
  elif family == "mistral":  # llama.cpp's llama architecture has no window: the prompt fits it
    kw.update(sliding_window=64)
  cfg = family_config(family, **kw)
  return family_params(cfg), cfg


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text", "mistral", "qwen3"])
def test_family_export_runs_in_llama_cpp(tiny_random, tmp_path, family):
  """Our params of each family through the quantize path (Q8_0): llama.cpp's tokens and logits
  against our quantized forward. The bundled llama.cpp predates Qwen3: its file reads back."""
  import gguf

  model_dir, _, _, tok = tiny_random
  params, cfg = _family(family)
  if family == "qwen2":
    with pytest.raises(ValueError, match="llama.cpp's qwen2 architecture"):
      gguf_export.check_architecture(cfg.replace(num_attention_heads=6))
  fmt = Q.QuantFormat.GGUF_Q8_0
  qp = quant_export.export_params(Q.quantize_params(params, cfg, fmt), cfg, fmt, "float32")
  out = quant_export.export(qp, cfg, fmt, str(tmp_path / "gguf"), source_dir=model_dir)
  path = f"{out}/{gguf_export.gguf_file_name(fmt)}"
  reader = gguf.GGUFReader(path)
  names = {t.name for t in reader.tensors}
  assert reader.fields["general.architecture"].contents() == gguf_export.architecture(cfg).name
  assert ("blk.0.attn_q.bias" in names) == (family == "qwen2")
  assert ("blk.0.attn_q_norm.weight" in names) == (family in ("qwen3", "gemma3_text"))
  if family == "gemma3_text":
    assert {"blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight",
            "blk.0.post_ffw_norm.weight"} <= names
    assert "output.weight" not in names  # the folded scale keeps the head tied
  if family == "qwen3":
    return
  llamacpp.load()
  with llamacpp.LlamaCpp(path) as llm:
    ids = llm.tokenize(PROMPTS[0])
    assert ids == tok(PROMPTS[0])["input_ids"]
    theirs = llm.logits(ids)
  ours = np.asarray(M.forward(qp, cfg, jnp.asarray([ids]))["logits"][0])
  # Measured (16 prompt tokens): Qwen2 1.7e-2, Gemma 3 1.3e-2, Mistral 2.0e-2; our own Q8_0
  # forward is 1.6e-2, 1.2e-2 and 2.6e-2 from the float model's.
  err = np.abs(theirs - ours).max() / np.abs(ours).max()
  assert err <= TOLERANCE, err
