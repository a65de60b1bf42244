"""Qwen2, Qwen3, Mistral and Gemma 3 (text): parity with transformers' own models, HF round
trips, sliding windows in packed rows and in the KV cache."""

import os

import jax
import numpy as np
import pytest
import torch
import transformers

from helpers import FAMILIES, covering_families, make_hf_family, torch_logits
from minitron_jax import config as C, model as M
from minitron_jax.io import hf as hf_io
from minitron_jax.io.safetensors import SafetensorsFile

FAMILY_NAMES = sorted(FAMILIES)


def _nll(logits_btv, tokens_bt):
  x = np.asarray(logits_btv, np.float64)  # float64 numpy: jax would round to float32
  x = x - x.max(-1, keepdims=True)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1).mean()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_logits_and_perplexity_match_transformers(tmp_path, family):
  model, d = make_hf_family(tmp_path / "hf", family)
  params, cfg = hf_io.load_hf(d)
  assert cfg.model_type == family
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 24))  # past every window
  ours = np.asarray(jax.jit(lambda p, t: M.forward(p, cfg, t)["logits"])(params, tokens))
  ref = torch_logits(model, tokens)
  assert np.abs(ours - ref).max() <= 1e-4
  ppl_ours, ppl_ref = np.exp(_nll(ours[:, :-1], tokens)), np.exp(_nll(ref[:, :-1], tokens))
  assert abs(ppl_ours / ppl_ref - 1) <= 1e-4


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_round_trip_is_bit_identical(tmp_path, family):
  model, d = make_hf_family(tmp_path / "hf", family)
  params, cfg = hf_io.load_hf(d)
  out = hf_io.save_hf(params, cfg, tmp_path / "out", source_dir=d)
  a, b = (SafetensorsFile(os.path.join(p, "model.safetensors")) for p in (d, out))
  assert sorted(a.keys()) == sorted(b.keys())
  for name in a.keys():
    x, y = a.get(name), b.get(name)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
  assert hf_io.load_config(out) == cfg
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(reloaded) is type(model)
  tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 20))
  np.testing.assert_allclose(torch_logits(reloaded, tokens), torch_logits(model, tokens),
                             atol=1e-5)  # eager (the source) vs the default sdpa


def test_packed_rows_with_sliding_windows_equal_separate_sequences(tmp_path):
  _, d = make_hf_family(tmp_path / "hf", "gemma3_text")  # sliding and global layers
  params, cfg = hf_io.load_hf(d)
  ab = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 10))  # both past the window
  packed = np.concatenate([ab[0], ab[1], [0, 0]])[None]
  seg = np.array([[1] * 10 + [2] * 10 + [0, 0]])
  pos = np.array([list(range(10)) * 2 + [0, 0]])
  out = M.forward(params, cfg, packed, positions_bt=pos, segment_ids_bt=seg)["logits"][0]
  ref = M.forward(params, cfg, ab)["logits"]
  np.testing.assert_allclose(out[:10], ref[0], atol=1e-5)
  np.testing.assert_allclose(out[10:20], ref[1], atol=1e-5)


@pytest.mark.parametrize("family", covering_families("gemma3_text"))
def test_cached_decode_equals_full_forward(tmp_path, family):
  """Left-padded prompts, then decoding past the sliding window, token by token (the window
  counts real tokens, so a row's result does not depend on its padding)."""
  _, d = make_hf_family(tmp_path / "hf", family)
  params, cfg = hf_io.load_hf(d)
  rng = np.random.RandomState(0)
  seqs = [rng.randint(3, cfg.vocab_size, n) for n in (7, 4)]
  steps = rng.randint(3, cfg.vocab_size, (2, 8)).astype(np.int32)
  t = 7
  tokens, valid = np.zeros((2, t), np.int32), np.zeros((2, t), bool)
  for i, s in enumerate(seqs):
    tokens[i, t - len(s):], valid[i, t - len(s):] = s, True
  cache = M.init_cache(cfg, 2, 32)
  step = jax.jit(M.forward_cached, static_argnums=(1,))
  logits, cache = step(params, cfg, tokens, valid, cache)
  got = [np.asarray(logits[:, -1])]
  for j in range(steps.shape[1]):
    logits, cache = step(params, cfg, steps[:, j:j + 1], np.ones((2, 1), bool), cache)
    got.append(np.asarray(logits[:, 0]))
  # The reference: both rows in one full forward, right-padded (segment 0) to one length.
  full_tokens, seg = np.zeros((2, 15), np.int32), np.zeros((2, 15), np.int32)
  for i, s in enumerate(seqs):
    n = len(s) + steps.shape[1]
    full_tokens[i, :n], seg[i, :n] = np.concatenate([s, steps[i]]), 1
  full = np.asarray(M.forward(params, cfg, full_tokens, segment_ids_bt=seg)["logits"])
  for i, s in enumerate(seqs):
    want = full[i, len(s) - 1:len(s) + steps.shape[1]]
    np.testing.assert_allclose(np.stack([g[i] for g in got]), want, atol=2e-5)


def test_unmodelled_attributes_are_refused_by_name():
  base = transformers.Gemma3TextConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, head_dim=16).to_diff_dict()
  for key, value in (("final_logit_softcapping", 30.0), ("attn_logit_softcapping", 50.0),
                     ("use_bidirectional_attention", True), ("attention_bias", True)):
    with pytest.raises(C.ConfigError, match=key):
      C.LlamaConfig.from_hf({**base, key: value})
  with pytest.raises(C.ConfigError, match="gemma3_text"):
    C.LlamaConfig.from_hf({**base, "model_type": "gemma3"})
  qwen3 = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=2).to_diff_dict()
  with pytest.raises(C.ConfigError, match="attention_bias"):
    C.LlamaConfig.from_hf({**qwen3, "attention_bias": True})
  mistral = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=2).to_diff_dict()
  with pytest.raises(C.ConfigError, match="layer_types"):
    C.LlamaConfig.from_hf({**mistral, "layer_types": ["full_attention"] * 2})
  with pytest.raises(C.ConfigError, match="sliding_window"):
    C.LlamaConfig.from_hf({**transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2).to_diff_dict(), "sliding_window": 8})


# Parameter counts the model cards publish (tied embeddings counted once).
PUBLISHED = {"qwen2.5-0.5b": 494_032_768, "qwen3-0.6b": 596_049_920,
             "mistral-7b-v0.1": 7_241_732_096, "gemma3-270m": 268_098_176}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_family_presets_have_the_published_sizes(name):
  cfg = C.preset(name, dtype="bfloat16")
  shapes = jax.eval_shape(lambda k: M.init_params(cfg, k, jax.numpy.bfloat16), jax.random.key(0))
  assert M.num_params(shapes) == cfg.num_params() == PUBLISHED[name]
  logits = jax.eval_shape(lambda p, t: M.forward(p, cfg, t)["logits"], shapes,
                          jax.ShapeDtypeStruct((1, 16), jax.numpy.int32))
  assert logits.shape == (1, 16, cfg.vocab_size)
  assert C.LlamaConfig.from_hf(cfg.to_hf(), dtype="bfloat16") == cfg


# A Gemma-style turn template (Qwen's and Mistral's differ only in their markers).
_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn> {{ m['role'] }} "
             "{{ m['content'] }} <end_of_turn> {% endfor %}"
             "{% if add_generation_prompt %}<start_of_turn> model {% endif %}")


def test_generation_prompts_use_the_checkpoints_own_chat_template(tmp_path):
  """The template travels with the tokenizer through our export, and chat prompts go through
  it."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  from minitron_jax.evaluate import generate as G

  words = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "user", "model",
           "hello", "world"]
  backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>",
                                             eos_token="<eos>", pad_token="<pad>")
  tok.chat_template = _TEMPLATE
  _, d = make_hf_family(tmp_path / "hf", "gemma3_text")
  tok.save_pretrained(d)
  params, cfg = hf_io.load_hf(d)
  out = hf_io.save_hf(params, cfg, tmp_path / "out", source_dir=d)
  loaded = hf_io.load_tokenizer(out)
  ids = G.encode_prompt(loaded, "hello world", chat=True)
  assert [words[i] for i in ids] == ["<bos>", "<start_of_turn>", "user", "hello", "world",
                                     "<end_of_turn>", "<start_of_turn>", "model"]
  assert G.encode_prompt(loaded, "hello world") != ids  # plain prompts skip the template
