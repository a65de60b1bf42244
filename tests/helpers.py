"""Shared test utilities: tiny random HF Llama checkpoints made with transformers."""

from __future__ import annotations

import contextlib
import os

import numpy as np


def make_hf_llama(out_dir, *, vocab=128, hidden=64, inter=96, layers=2, heads=4, kv_heads=2,
                  head_dim=None, tie=False, rope_scaling=None, rope_theta=10000.0, seed=0,
                  dtype="float32", max_pos=256):
  """Saves a random transformers LlamaForCausalLM and returns (model, out_dir)."""
  import torch
  import transformers

  kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=max_pos, tie_word_embeddings=tie, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
  if head_dim is not None:
    kw["head_dim"] = head_dim
  kw["rope_theta"] = rope_theta
  if rope_scaling is not None:
    kw["rope_scaling"] = rope_scaling
  cfg = transformers.LlamaConfig(**kw)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg)
  # Non-trivial norms so a transposed/misplaced norm cannot pass.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  model = model.to(getattr(torch, dtype)).eval()
  model.save_pretrained(out_dir, safe_serialization=True)
  return model, os.fspath(out_dir)


# Tiny configs of each family (transformers' config kwargs beyond the shared sizes); sliding
# windows shorter than the test sequences, explicit head_dims that differ from hidden/heads.
FAMILIES = {
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "qwen3": dict(head_dim=24, tie_word_embeddings=True),
    "mistral": dict(sliding_window=6, head_dim=24),
    "gemma3_text": dict(head_dim=24, sliding_window=5, query_pre_attn_scalar=20,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={
                            "full_attention": {"rope_type": "linear", "factor": 2.0,
                                               "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
}
_FAMILY_CLASSES = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                   "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                   "mistral": ("MistralConfig", "MistralForCausalLM"),
                   "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM")}


def make_hf_family(out_dir, family, *, vocab=128, hidden=64, inter=96, layers=3, heads=4,
                   kv_heads=2, seed=0, dtype="float32", max_pos=256, **overrides):
  """Saves a random transformers model of `family` (a `FAMILIES` key) with non-trivial norm
  weights and biases; returns (model, out_dir)."""
  import torch
  import transformers

  config_cls, model_cls = (getattr(transformers, n) for n in _FAMILY_CLASSES[family])
  kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=max_pos, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            **{**FAMILIES[family], **overrides})
  cfg = config_cls(**kw)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = model_cls(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # Gemma's (1 + w) norms start at w = 0, the others at 1
        p.copy_((0.0 if family == "gemma3_text" else 1.0) + 0.2 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.5 * torch.randn_like(p))
  model = model.to(getattr(torch, dtype)).eval()
  model.save_pretrained(out_dir, safe_serialization=True)
  return model, os.fspath(out_dir)


# Our configs of each family on the tiny preset (6 query heads in 2 KV groups, 3 layers):
# every switch a family sets, windows shorter than a 12-token test sequence.
_S, _F = "sliding_attention", "full_attention"
FAMILY_CONFIGS = {
    "qwen2": dict(attention_bias=True, sliding_window=5, layer_types=(_F, _S, _S)),
    "qwen3": dict(qk_norm=True, tie_word_embeddings=True),
    "mistral": dict(sliding_window=6),
    "gemma3_text": dict(qk_norm=True, norm_plus_one=True, embed_scale=8.0,
                        hidden_act="gelu_pytorch_tanh", sandwich_norms=True,
                        query_pre_attn_scalar=20.0, sliding_window=5, layer_types=(_S, _F, _S),
                        rope_local_base_freq=100.0, tie_word_embeddings=True),
}


def covering_families(*default):
  """Families an expensive test runs: `default` (those whose switches cover the rest: Qwen2's
  biases and mixed windows, Gemma 3's every other switch), or all of them with
  MINITRON_JAX_ALL_FAMILIES=1."""
  if os.environ.get("MINITRON_JAX_ALL_FAMILIES"):
    return sorted(FAMILY_CONFIGS)
  return list(default or ("gemma3_text", "qwen2"))


def family_config(family, **overrides):
  """A tiny `LlamaConfig` of `family` (a `FAMILY_CONFIGS` key)."""
  from minitron_jax import config as C

  kw = {"num_attention_heads": 6, "num_key_value_heads": 2, "num_hidden_layers": 3,
        **FAMILY_CONFIGS[family], **overrides}
  if kw.get("layer_types"):
    kw["layer_types"] = tuple(kw["layer_types"][:kw["num_hidden_layers"]])
  return C.preset("tiny").replace(model_type=family, **kw)


def family_params(cfg, seed=0):
  """Random params with non-trivial norms (around 0 for (1 + w) norms) and biases."""
  import jax

  from minitron_jax import axes, model as M

  p = M.init_params(cfg, jax.random.key(seed), std=0.1)
  leaves = []
  for i, (spec, x) in enumerate(axes.iter_leaves(p, cfg)):
    noise = jax.random.normal(jax.random.key(seed * 100 + i + 1), x.shape)
    if axes.is_norm(spec):
      x = (0.0 if cfg.norm_plus_one else 1.0) + 0.2 * noise
    elif spec.path[-1].endswith("bias"):
      x = 0.5 * noise
    leaves.append((spec, x))
  return axes.tree_from_leaves(leaves)


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch

  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


@contextlib.contextmanager
def float64_transformers(model):
  """A float64 copy of a transformers Llama with its float32 islands (RMSNorm, RoPE angles,
  eager softmax) removed, for use inside the block: the float64 reference."""
  import copy
  from unittest import mock

  import torch
  from transformers.models.llama import modeling_llama as ml

  def norm(self, h):
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

  def rope(self, x, position_ids):
    emb = position_ids[..., None].double() * self.inv_freq.double()
    emb = torch.cat((emb, emb), dim=-1)
    return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

  ref = copy.deepcopy(model).double()
  ref.set_attn_implementation("sdpa")  # eager attention takes its softmax in float32
  with mock.patch.object(ml.LlamaRMSNorm, "forward", norm), \
       mock.patch.object(ml.LlamaRotaryEmbedding, "forward", rope):
    yield ref


@contextlib.contextmanager
def count_compiles():
  """Yields a list that gains one entry per XLA compilation inside the block."""
  import jax

  seen = []

  def listener(name, *args, **kwargs):
    if name.endswith("backend_compile_duration"):
      seen.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


# Recipe teachers of each family (`make_family_teacher`): the tiny recipe's sizes (hidden 128,
# MLP 256, 4 layers, 4 heads / 2 KV heads) with the family's switches, windows shorter than the
# recipe's 32-token training rows. Gemma 3 has llama.cpp's layer pattern (a global layer after
# five sliding ones) and query scale, so that its GGUF exports are possible.
RECIPE_FAMILIES = {
    "qwen2": dict(tie_word_embeddings=True, use_sliding_window=False, sliding_window=None),
    "qwen3": dict(head_dim=48),
    "mistral": dict(sliding_window=12, head_dim=48),
    "gemma3_text": dict(layers=6, sliding_window=12, layer_types=[_S] * 5 + [_F],
                        query_pre_attn_scalar=24,
                        rope_parameters={
                            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def make_family_teacher(out_dir, family, tokenizer_dir, seed=0):
  """A random `family` model the size of the tiny recipe's teacher (`RECIPE_FAMILIES`), with
  the tokenizer (and its vocabulary) of `tokenizer_dir`; returns its directory."""
  import shutil

  import transformers

  vocab = transformers.AutoConfig.from_pretrained(str(tokenizer_dir)).vocab_size
  kw = dict(vocab=vocab, hidden=128, inter=256, layers=4, heads=4, kv_heads=2, max_pos=512)
  _, d = make_hf_family(out_dir, family, seed=seed, **{**kw, **RECIPE_FAMILIES[family]})
  for f in TOKENIZER_FILES:
    if os.path.exists(os.path.join(tokenizer_dir, f)):
      shutil.copy(os.path.join(tokenizer_dir, f), d)
  return d


def recipe_command(teacher, run_dir, data_root, *extra):
  """`launch/minitron.py` on the tiny recipe with `teacher`, as a subprocess argument list."""
  import os
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return [sys.executable, os.path.join(root, "launch", "minitron.py"),
          f"--config={os.path.join(root, 'configs', 'tiny.py')}", f"--config.teacher={teacher}",
          f"--config.run_dir={run_dir}", f"--config.data_root={data_root}", *extra]


@contextlib.contextmanager
def offline_datasets(tmp):
  """No hub traffic and a private `datasets` cache under `tmp`; yields the MonkeyPatch."""
  import datasets
  import pytest

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp / "datasets_cache"))
    yield mp
