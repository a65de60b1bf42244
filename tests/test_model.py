"""Logit parity with transformers, HF round trips, and the KV-cache / packing paths."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from helpers import float64_transformers, make_hf_llama, torch_logits
from minitron_jax import axes, config as C, model as M
from minitron_jax.io import files
from minitron_jax.io import hf as hf_io
from minitron_jax.io.safetensors import SafetensorsFile

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
CASES = {
    "gqa": dict(heads=4, kv_heads=2),
    "mha": dict(heads=4, kv_heads=4),
    "mqa": dict(heads=4, kv_heads=1),
    "tied": dict(heads=4, kv_heads=2, tie=True),
    "head_dim_24": dict(heads=4, kv_heads=2, head_dim=24),
    "llama3_rope": dict(heads=4, kv_heads=2, rope_scaling=LLAMA3, rope_theta=500000.0),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "yarn_rope": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 32}, max_pos=128),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logit_parity_with_transformers(tmp_path, case):
  model, d = make_hf_llama(tmp_path / "hf", **CASES[case])
  params, cfg = hf_io.load_hf(d)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 96))  # past 32: scaled rope
  ours = np.asarray(jax.jit(lambda p, t: M.forward(p, cfg, t)["logits"])(params, tokens))
  ref = torch_logits(model, tokens)
  assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_identical_and_loads_in_transformers(tmp_path, dtype):
  model, d = make_hf_llama(tmp_path / "hf", heads=4, kv_heads=2, dtype=dtype)
  params, cfg = hf_io.load_hf(d)
  out = hf_io.save_hf(params, cfg, tmp_path / "out", source_dir=d)
  a, b = SafetensorsFile(os.path.join(d, "model.safetensors")), \
      SafetensorsFile(os.path.join(out, "model.safetensors"))
  assert sorted(a.keys()) == sorted(b.keys())
  for name in a.keys():
    x, y = a.get(name), b.get(name)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 40))
  np.testing.assert_allclose(torch_logits(reloaded, tokens),
                             torch_logits(model.float(), tokens), atol=1e-5)
  saved = files.read_json(os.path.join(out, "config.json"))
  assert saved["head_dim"] == cfg.head_dim and saved["torch_dtype"] == dtype
  assert os.path.isfile(os.path.join(out, "generation_config.json"))


def test_sharded_save_writes_index_and_loads(tmp_path):
  model, d = make_hf_llama(tmp_path / "hf", tie=False)
  params, cfg = hf_io.load_hf(d)
  out = hf_io.save_hf(params, cfg, tmp_path / "out", max_shard_bytes=40_000)
  index = files.read_json(os.path.join(out, hf_io.INDEX_FILE))
  shards = set(index["weight_map"].values())
  assert len(shards) > 2 and not os.path.exists(os.path.join(out, hf_io.SINGLE_FILE))
  params2, _ = hf_io.load_hf(out)
  for (s, x), (_, y) in zip(axes.iter_leaves(params, cfg), axes.iter_leaves(params2, cfg)):
    assert np.array_equal(np.asarray(x), np.asarray(y)), s.name
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = np.arange(30)[None] % cfg.vocab_size
  np.testing.assert_allclose(torch_logits(reloaded, tokens), torch_logits(model, tokens),
                             atol=1e-5)


def test_packed_segments_equal_separate_sequences():
  cfg = C.preset("tiny")
  params = M.init_params(cfg, jax.random.key(0))
  rng = np.random.RandomState(0)
  a, b = rng.randint(0, cfg.vocab_size, 7), rng.randint(0, cfg.vocab_size, 5)
  packed = np.concatenate([a, b, [0, 0]])[None]
  seg = np.array([[1] * 7 + [2] * 5 + [0, 0]])
  pos = np.array([list(range(7)) + list(range(5)) + [0, 0]])
  out = M.forward(params, cfg, packed, positions_bt=pos, segment_ids_bt=seg)["logits"][0]
  ref_a = M.forward(params, cfg, a[None])["logits"][0]
  ref_b = M.forward(params, cfg, b[None])["logits"][0]
  np.testing.assert_allclose(out[:7], ref_a, atol=1e-5)
  np.testing.assert_allclose(out[7:12], ref_b, atol=1e-5)
  assert np.isfinite(np.asarray(out)).all()


def test_cached_decode_of_left_padded_batch_equals_full_forward():
  cfg = C.preset("tiny")
  params = M.init_params(cfg, jax.random.key(1))
  rng = np.random.RandomState(0)
  seqs = [rng.randint(3, cfg.vocab_size, n) for n in (9, 5)]
  t = 9
  tokens = np.zeros((2, t), np.int32)
  valid = np.zeros((2, t), bool)
  for i, s in enumerate(seqs):
    tokens[i, t - len(s):], valid[i, t - len(s):] = s, True
  cache = M.init_cache(cfg, 2, 16)
  logits, cache = M.forward_cached(params, cfg, tokens, valid, cache)
  nxt = np.array([[5], [7]], np.int32)
  step_logits, cache = M.forward_cached(params, cfg, nxt, np.ones((2, 1), bool), cache)
  for i, s in enumerate(seqs):
    full = M.forward(params, cfg, np.concatenate([s, nxt[i]])[None])["logits"][0]
    np.testing.assert_allclose(logits[i, -1], full[-2], atol=1e-5)
    np.testing.assert_allclose(step_logits[i, 0], full[-1], atol=1e-5)


def test_cached_decode_attending_to_a_length_bucket_is_unchanged():
  """Attending only to the first `attend_len` slots (a bucket of the filled length) gives the
  logits of attending to the whole cache, and the cache is updated in place under a donating
  jit (no second cache-sized buffer)."""
  cfg = C.preset("tiny")
  params = M.init_params(cfg, jax.random.key(2))
  rng = np.random.RandomState(1)
  tokens = rng.randint(3, cfg.vocab_size, (2, 6)).astype(np.int32)
  valid = np.ones((2, 6), bool)
  valid[1, :2] = False
  step = jax.jit(M.forward_cached, static_argnums=(1, 5), donate_argnums=(4,))
  full, short = M.init_cache(cfg, 2, 64), M.init_cache(cfg, 2, 64)
  lf, full = step(params, cfg, tokens, valid, full, None)
  ls, short = step(params, cfg, tokens, valid, short, 8)
  np.testing.assert_allclose(ls, lf, atol=1e-6)
  for i in range(5):  # decode past the 8-slot bucket into the 16-slot one
    nxt = rng.randint(3, cfg.vocab_size, (2, 1)).astype(np.int32)
    lf, full = step(params, cfg, nxt, np.ones((2, 1), bool), full, None)
    ls, short = step(params, cfg, nxt, np.ones((2, 1), bool), short, 8 if i < 2 else 16)
    np.testing.assert_allclose(ls, lf, atol=1e-6)
  for k in ("valid", "index", "next_position"):
    np.testing.assert_array_equal(np.asarray(short[k]), np.asarray(full[k]))
  for k in ("k", "v"):  # later layers see attention outputs summed in another order
    np.testing.assert_allclose(np.asarray(short[k]), np.asarray(full[k]), atol=1e-6)
  with pytest.raises(ValueError, match="attend_len"):
    M.forward_cached(params, cfg, nxt, np.ones((2, 1), bool), short, attend_len=128)
  # Scratch memory of one decode step follows the attended bucket, not the cache: re-stacking
  # the cache per layer (the old scan outputs) needed twice the cache in temporaries.
  big = M.init_cache(cfg, 2, 2048)
  mem = step.lower(params, cfg, nxt, np.ones((2, 1), bool), big, 16).compile().memory_analysis()
  if mem is not None:
    assert mem.temp_size_in_bytes < (big["k"].nbytes + big["v"].nbytes) / 4


def test_hidden_states_and_taps_match_transformers(tmp_path):
  model, d = make_hf_llama(tmp_path / "hf", layers=3)
  params, cfg = hf_io.load_hf(d)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 20))
  out = M.forward(params, cfg, tokens, return_hidden=True,
                  taps={"mlp_act": lambda x: x, "attn_heads": lambda x: x})
  with torch.no_grad():
    ref = model(torch.as_tensor(tokens), output_hidden_states=True).hidden_states
  # HF: embeddings, the outputs of layers 0..L-2, then the final-normed output of layer L-1.
  np.testing.assert_allclose(out["embeddings"], ref[0].numpy(), atol=1e-5)
  for i in range(cfg.num_hidden_layers - 1):
    np.testing.assert_allclose(out["hidden"][i], ref[i + 1].numpy(), atol=1e-5)
  assert out["taps"]["mlp_act"].shape == (3, 2, 20, cfg.intermediate_size)
  assert out["taps"]["attn_heads"].shape == (3, 2, 20, cfg.num_attention_heads, cfg.head_dim)
  # The head outputs are exactly what o_proj consumes.
  o = params["layers"]["o"][0]
  attn_out = np.einsum("btnh,nhd->btd", out["taps"]["attn_heads"][0], o)
  np.testing.assert_allclose(out["hidden"][0] - out["embeddings"],
                             attn_out + np.einsum("btf,fd->btd", out["taps"]["mlp_act"][0],
                                                  params["layers"]["down"][0]), atol=1e-5)


# Each recipe's teacher, as a preset of the same architecture (no download).
TEACHER_PRESETS = {"smollm2-135m": "smollm2-135m", "meta-llama/Llama-3.1-8B": "llama3.1-8b",
                   "gemma3-270m": "gemma3-270m"}


@pytest.mark.parametrize("config_file,billions", [
    ("smollm2_135m", None), ("gemma3_270m", None), ("llama31_8b_to_4b_width", 4.51),
    ("llama31_8b_to_4b_depth", 4.54)])
def test_eval_shape_full_size_presets(config_file, billions):
  """Teacher and pruned student of each recipe in configs/, built abstractly (no memory)."""
  import importlib

  from minitron_jax.prune.slicing import Targets

  recipe = importlib.import_module(f"configs.{config_file}").get_config()
  teacher = C.preset(TEACHER_PRESETS[recipe.teacher], dtype="bfloat16")
  # The students' shapes come from the recipe's targets through the prune run's own checks.
  students = [Targets.from_flags(teacher, **dict(recipe.prune[kind])).validate(teacher)
              for kind in recipe.prune.kinds]
  for cfg in [teacher] + students:
    shapes = jax.eval_shape(lambda k: M.init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
    assert M.num_params(shapes) == cfg.num_params()
    logits = jax.eval_shape(lambda p, t: M.forward(p, cfg, t)["logits"], shapes,
                            jax.ShapeDtypeStruct((1, 16), jnp.int32))
    assert logits.shape == (1, 16, cfg.vocab_size)
  n_teacher = teacher.num_params()
  if billions is None:  # SmolLM2-135M, Gemma 3 270M: students keep about half the body
    assert n_teacher == {"smollm2-135m": 134_515_008, "gemma3-270m": 268_098_176}[recipe.teacher]

    def body(c):
      return c.num_params() - c.vocab_size * c.hidden_size

    for s in students:
      if s != teacher:
        assert 0.45 < body(s) / body(teacher) < 0.55, s
  else:  # Llama-3.1-8B: 8.03B; the Minitron-4B student: 4.5B as published
    assert round(n_teacher / 1e9, 2) == 8.03
    student = next(s for s in students if s != teacher)
    assert abs(student.num_params() / 1e9 - billions) < 0.01, student.num_params()


def test_bfloat16_compute_tracks_float32(tmp_path):
  model, d = make_hf_llama(tmp_path / "hf", heads=4, kv_heads=2)
  params, cfg = hf_io.load_hf(d)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 64))
  f32 = np.asarray(M.forward(params, cfg, tokens)["logits"])
  out = M.forward(params, cfg.replace(dtype="bfloat16"), tokens, return_hidden=True)
  assert out["hidden"].dtype == jnp.bfloat16 and out["logits"].dtype == jnp.float32
  bf16 = np.asarray(out["logits"])
  assert np.abs(bf16 - f32).max() < 0.05 * np.abs(f32).max()
  assert (bf16.argmax(-1) == f32.argmax(-1)).mean() > 0.9


def test_float64_compute_is_float64_throughout(tmp_path):
  """dtype float64 (a reference run) leaves no float32 step: its logits equal a float64
  transformers forward to 1e-10, where float32 compute is 1e-6 away; without 64-bit JAX
  the config refuses it by name."""
  model, d = make_hf_llama(tmp_path / "hf", heads=4, kv_heads=2)
  params, cfg = hf_io.load_hf(d)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 64))
  f32 = np.asarray(M.forward(params, cfg, tokens)["logits"], np.float64)
  with pytest.raises(C.ConfigError, match="JAX_ENABLE_X64"):
    cfg.replace(dtype="float64")
  with float64_transformers(model) as ref, torch.no_grad():
    ref = ref(torch.as_tensor(tokens)).logits.numpy()
  with jax.enable_x64(True):
    p64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
    logits = M.forward(p64, cfg.replace(dtype="float64"), tokens)["logits"]
    nll = M.token_nll_bt(logits, jnp.asarray(tokens))
    assert logits.dtype == jnp.float64 and nll.dtype == jnp.float64
    ours = np.asarray(logits)
  assert np.abs(ours - ref).max() <= 1e-10
  assert np.abs(f32 - ref).max() > 1e-8  # float32 rounding is visible at this scale
