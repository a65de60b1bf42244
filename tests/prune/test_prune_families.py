"""Pruning each family (Qwen2, Qwen3, Mistral, Gemma 3): equivalences with the teacher whose
pruned units are zeroed (biases, q/k norms and Gemma's norms included), depth pruning keeping
each layer's kind, and pruned exports that transformers loads with our logits."""

import os

import numpy as np
import pytest
import torch
import transformers

from helpers import (FAMILY_CONFIGS, covering_families, family_config, family_params,
                     make_hf_family, torch_logits)
from minitron_jax import axes, model as M
from minitron_jax.io import files, hf as hf_io, hf_compat
from minitron_jax.io.safetensors import SafetensorsFile
from minitron_jax.prune import importance as I, search as S, slicing

FAMILIES = {name: family_config(name) for name in FAMILY_CONFIGS}
_params = family_params


def _logits(p, cfg, **kw):
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12))  # past the windows
  return np.asarray(M.forward(p, cfg, tokens, **kw)["logits"])


def _zero_o_heads(p, keep):
  mask = np.zeros(p["layers"]["o"].shape[:2], np.float32)
  np.put_along_axis(mask, keep, 1.0, axis=1)
  return {**p, "layers": {**p["layers"], "o": p["layers"]["o"] * mask[:, :, None, None]}}


# Qwen2 (biases, mixed windows) and Gemma 3 (q/k norms, (1 + w) and sandwich norms, GeGLU)
# cover every switch; Qwen3 and Mistral are their subsets.
COVERING = covering_families()


@pytest.mark.parametrize("family", COVERING)
def test_pruning_units_equals_zeroing_them(family):
  """Query heads (biases follow, q/k norms stay whole), whole KV groups, MLP neurons."""
  cfg = FAMILIES[family]
  p = _params(cfg)
  groups = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
  heads = np.random.RandomState(2).rand(3, 6)
  kv, keep = slicing.select_heads(heads, groups, cfg, 3, 1)
  pruned, new = slicing.prune(p, cfg, slicing.PrunePlan(q_heads=keep, kv_heads=kv))
  if cfg.attention_bias:
    np.testing.assert_array_equal(pruned["layers"]["k_bias"][:, 0],
                                  np.asarray(p["layers"]["k_bias"])[np.arange(3), kv[:, 0]])
  if cfg.qk_norm:
    np.testing.assert_array_equal(pruned["layers"]["q_norm"], p["layers"]["q_norm"])
  np.testing.assert_allclose(_logits(pruned, new), _logits(_zero_o_heads(p, keep), cfg),
                             atol=1e-5)
  neurons = np.sort(np.stack([np.random.RandomState(l).choice(128, 50, replace=False)
                              for l in range(3)]), -1)
  pruned, new = slicing.prune(p, cfg, slicing.PrunePlan(mlp=neurons))
  mask = np.zeros((3, 128), np.float32)
  np.put_along_axis(mask, neurons, 1.0, axis=1)
  zeroed = {**p, "layers": {**p["layers"], "down": p["layers"]["down"] * mask[:, :, None]}}
  np.testing.assert_allclose(_logits(pruned, new), _logits(zeroed, cfg), atol=1e-5)


@pytest.mark.parametrize("family", COVERING)
def test_depth_pruning_keeps_each_layers_kind(family):
  cfg = FAMILIES[family]
  p = _params(cfg)
  pruned, new = slicing.prune(p, cfg, slicing.PrunePlan(layers=np.array([1, 2])))
  assert new.sliding_layers == cfg.sliding_layers[1:]
  np.testing.assert_allclose(_logits(pruned, new),
                             _logits(p, cfg, layer_mask=np.array([False, True, True])),
                             atol=1e-5)


@pytest.mark.parametrize("family", COVERING)
def test_hidden_channel_pruning_slices_every_norm_once(family):
  cfg = FAMILIES[family]
  p = _params(cfg)
  keep = np.sort(np.random.RandomState(3).choice(64, 40, replace=False))
  pruned, new = slicing.prune(p, cfg, slicing.PrunePlan(embed=keep))
  assert new.hidden_size == 40 and new.embed_scale == cfg.embed_scale  # the teacher's
  for spec in axes.param_specs(cfg):
    if axes.EMBED in spec.axes:
      want = np.take(np.asarray(axes.get(p, spec)), keep, axis=spec.axes.index(axes.EMBED))
      np.testing.assert_array_equal(axes.get(pruned, spec), want, err_msg=spec.name)
  assert ("lm_head" in pruned) == (not cfg.tie_word_embeddings)
  assert np.isfinite(_logits(pruned, new)).all()


@pytest.mark.parametrize("family", COVERING)
def test_pruned_exports_load_in_transformers_with_our_logits(tmp_path, family):
  """In memory and streamed from disk; Gemma's kept embedding scale is folded for HF."""
  _, src = make_hf_family(tmp_path / "src", family)
  params, cfg = hf_io.load_hf(src)
  targets = slicing.Targets(hidden_size=48, intermediate_size=64, num_attention_heads=2,
                            num_key_value_heads=1, drop_layers=(1,))
  plan = slicing.make_plan(cfg, targets, I.random_scores(cfg, 1))
  pruned, new = slicing.prune(params, cfg, plan)
  mem = hf_io.save_hf(pruned, new, tmp_path / "mem")
  streamed = slicing.prune_checkpoint(src, str(tmp_path / "stream"), plan)
  assert streamed.layer_types == new.layer_types
  a, b = (SafetensorsFile(os.path.join(d, "model.safetensors")) for d in (mem, tmp_path / "stream"))
  assert sorted(a.keys()) == sorted(b.keys())
  for name in a.keys():
    assert a.get(name).tobytes() == b.get(name).tobytes(), name
  # Gemma's kept scale folds into the table and the final norm: a tied head stays tied.
  assert ("lm_head.weight" in a.keys()) == (not cfg.tie_word_embeddings)
  assert files.read_json(os.path.join(mem, "config.json"))["tie_word_embeddings"] == \
      cfg.tie_word_embeddings
  hf_compat.allow_explicit_head_dim()
  ref = transformers.AutoModelForCausalLM.from_pretrained(mem, dtype=torch.float32).eval()
  tokens = np.random.RandomState(4).randint(0, cfg.vocab_size, (1, 20))
  ours = np.asarray(M.forward(pruned, new, tokens)["logits"])
  assert np.abs(ours - torch_logits(ref, tokens)).max() <= 1e-4


@pytest.mark.parametrize("family", COVERING)
def test_search_accounting_counts_each_familys_leaves(family):
  cfg = FAMILIES[family]
  p = _params(cfg)
  scores, layers = I.random_scores(cfg, 0), np.random.default_rng(1).random(3)
  for c in (S.Candidate(48, (64,) * 2, 2, 1), S.Candidate(64, (128,) * 3, 3, 2)):
    pruned, new = slicing.prune(p, cfg, S.plan_for(cfg, c, scores, layers))
    assert S.param_count(cfg, c) == M.num_params(pruned) == new.num_params(), c


def test_channel_importance_reads_every_norm_output_of_gemma():
  """Hidden channels score by every norm's output, Gemma's sandwich norms included
  (default aggregation: L2 over the batch of each token's mean |x| over the sequence)."""
  cfg = FAMILIES["gemma3_text"]
  p = _params(cfg)
  batch = np.random.RandomState(5).randint(0, cfg.vocab_size, (3, 10))
  scores = I.activation_scores(p, cfg, [batch])
  names = ("attn_in", "mlp_in", "attn_out", "mlp_out", "final_norm")
  taps = M.forward(p, cfg, batch, taps={n: (lambda x: x) for n in names})["taps"]
  want = 0.0
  for n in names:
    x = np.abs(np.asarray(taps[n], np.float64)).mean(-2)  # (L,) B, D: mean over tokens
    x = np.sqrt((x ** 2).sum(-2))  # L2 over the batch
    want = want + (x.sum(0) if n != "final_norm" else x)
  np.testing.assert_allclose(scores.channels, want, rtol=2e-4)
