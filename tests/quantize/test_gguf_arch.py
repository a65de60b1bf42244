"""GGUF export per architecture, on the HF tensors of tiny random transformers models.

The tensors go through `gguf_export.write_tensors` (names, q/k permutation, norm shift,
metadata) without our model, so each family is checked before the model runs it: the file
reads back with gguf's reader under llama.cpp's names (listed here by hand from its
`tensor_mapping.py`), and where the bundled llama.cpp knows the architecture (llama, qwen2,
gemma3; not qwen3) it runs the file and matches transformers' logits.
"""

import types

import gguf
import numpy as np
import pytest

import llamacpp
from minitron_jax.io import registry
from minitron_jax.io.gguf_import import unpermute_qk
from minitron_jax.quantize import formats as Q
from minitron_jax.quantize import gguf_export

COMMON = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2, pad_token_id=2)
FAMILIES = {
    # Mistral NeMo's explicit head_dim (not hidden / heads), untied, a sliding window llama.cpp's
    # llama architecture ignores (the prompt stays inside it).
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(num_hidden_layers=2, head_dim=32, tie_word_embeddings=False,
                     sliding_window=64, rope_theta=1e6)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(num_hidden_layers=2, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(num_hidden_layers=2, head_dim=32, tie_word_embeddings=True, rope_theta=1e6)),
    # Six layers: five sliding-window ones and a global one; a window shorter than the prompt.
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16,
                         sliding_window=6, rope_theta=1e6, rope_local_base_freq=1e4)),
}
ARCH = {"mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
# llama.cpp's block tensors -> HF modules, per architecture.
_BASE = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm"}
_QK = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
BLOCK = {
    "llama": {**_BASE, "ffn_norm": "post_attention_layernorm"},
    "qwen2": {**_BASE, "ffn_norm": "post_attention_layernorm"},
    "qwen3": {**_BASE, **_QK, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {**_BASE, **_QK, "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}
PROMPT = "The quick brown fox jumps over 13 lazy dogs, doesn't it? Yes it does."


def _tiny(family, tmp_path):
  """(torch model, HF tensors, config stand-in) of a random model with non-trivial norms and
  biases."""
  import torch
  import transformers

  config_cls, model_cls, extra = FAMILIES[family]
  kw = {**COMMON, **extra}
  torch.manual_seed(0)
  model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(0.1 * torch.randn_like(p) + (0.0 if family == "gemma3_text" else 1.0))
      elif name.endswith("bias"):
        p.copy_(0.5 * torch.randn_like(p))
  tensors = {k: v.numpy() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and kw.get("tie_word_embeddings", True))}
  hd = kw.get("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
  cfg = types.SimpleNamespace(
      model_type=family, head_dim=hd, rope_scaling=types.SimpleNamespace(rope_type="default"),
      eos_token_ids=(kw["eos_token_id"],), layer_types=getattr(model.config, "layer_types", None),
      **{k: v for k, v in kw.items() if k not in ("head_dim", "eos_token_id")})
  return model, tensors, cfg


def _write(tensors, cfg, path, source_dir=None):
  gguf_export.write_tensors(str(path), cfg, Q.QuantFormat.GGUF_Q8_0,
                            [(k, v, None) for k, v in tensors.items()], source_dir)
  return path


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reads_back_with_llama_cpp_names(family, tmp_path):
  _, tensors, cfg = _tiny(family, tmp_path)
  arch = ARCH[family]
  reader = gguf.GGUFReader(_write(tensors, cfg, tmp_path / "m.gguf"))
  assert reader.fields["general.architecture"].contents() == arch
  meta = {k: f.contents() for k, f in reader.fields.items()}
  assert meta[f"{arch}.attention.key_length"] == cfg.head_dim
  assert meta[f"{arch}.attention.head_count_kv"] == 2
  assert meta[f"{arch}.rope.freq_base"] == 1e6
  if arch == "gemma3":
    assert meta["gemma3.attention.sliding_window"] == 6
  names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight":
           "model.norm.weight", "output.weight": "lm_head.weight"}
  for i in range(cfg.num_hidden_layers):
    for g, h in BLOCK[arch].items():
      names[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
      names[f"blk.{i}.{g}.bias"] = f"model.layers.{i}.{h}.bias"
  got = {t.name: t for t in reader.tensors}
  assert {names[n] for n in got} == set(tensors)
  for name, t in got.items():
    hf = names[name]
    x = np.asarray(t.data, np.float32).reshape(tensors[hf].shape)
    if arch == "llama" and ".attn_q." in name:  # llama.cpp's interleaved RoPE rows
      x = unpermute_qk(x, cfg.num_attention_heads)
    elif arch == "llama" and ".attn_k." in name:
      x = unpermute_qk(x, cfg.num_key_value_heads)
    if arch == "gemma3" and name.endswith("norm.weight"):  # stored as 1 + w
      x = x - 1
    np.testing.assert_allclose(x, tensors[hf], rtol=1e-3, atol=1e-3, err_msg=name)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma3_text"])
def test_runs_in_llama_cpp(family, tmp_path):
  import torch

  llamacpp.load()
  source_dir = str(registry.resolve_model_dir("smollm2-tiny-random"))  # SmolLM2's tokenizer
  model, tensors, cfg = _tiny(family, tmp_path)
  with llamacpp.LlamaCpp(_write(tensors, cfg, tmp_path / "m.gguf", source_dir)) as llm:
    ids = llm.tokenize(PROMPT)
    theirs = llm.logits(ids)
  assert len(ids) > 2 * FAMILIES["gemma3_text"][2]["sliding_window"]
  with torch.no_grad():
    ours = model(torch.tensor([ids])).logits[0].numpy()
  # max |diff| / max |logit|, measured (F16 matrices, F16 activations in llama.cpp): Mistral
  # 5.1e-4, Qwen2 4.8e-4, Gemma 3 2.3e-3 (a global layer with sliding ones across the window).
  err = np.abs(theirs - ours).max() / np.abs(ours).max()
  assert err <= 1e-2, err


def test_refuses_what_llama_cpp_cannot_run(tmp_path):
  _, tensors, cfg = _tiny("gemma3_text", tmp_path)
  with pytest.raises(ValueError, match="rope_local_base_freq 5000"):
    gguf_export.check_architecture(types.SimpleNamespace(**{**vars(cfg),
                                                            "rope_local_base_freq": 5000.0}))
  with pytest.raises(ValueError, match="layer_types"):
    gguf_export.check_architecture(types.SimpleNamespace(
        **{**vars(cfg), "layer_types": ["full_attention"] * 6}))
  with pytest.raises(ValueError, match="model_type 'phi3'"):
    gguf_export.check_architecture(types.SimpleNamespace(**{**vars(cfg), "model_type": "phi3"}))
