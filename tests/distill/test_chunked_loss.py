"""Logits in chunks: the chunked losses equal the unchunked ones, value and gradient, and their
compiled temporary memory shrinks with the chunk."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax import config, model as M
from minitron_jax.distill import losses as distill
from minitron_jax.distill import step as train
from minitron_jax.distill.losses import DistillConfig
from minitron_jax.evaluate import scoring

T = 13  # odd: no chunk size below divides it evenly


@functools.lru_cache(maxsize=None)
def _pair():
  """An untied teacher and a narrower tied student (both heads: lm_head and embed)."""
  tcfg = config.preset("tiny", vocab_size=97)
  scfg = tcfg.replace(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      tie_word_embeddings=True)
  return (M.init_params(tcfg, jax.random.key(0)), tcfg,
          M.init_params(scfg, jax.random.key(1), std=0.2), scfg)


def _batch(seed, rows=2, t=T, vocab=97):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (rows, t)).astype(np.int32)
  segs = np.ones((rows, t), np.int32)
  segs[:, 6:] = 2
  segs[1, -2:] = 0  # padding
  pos = np.where(segs == 2, np.arange(t) - 6, np.arange(t)).astype(np.int32)
  pos[segs == 0] = 0
  return tokens, segs, pos


def _loss_fn(dcfg, chunk, proj=None):
  """(student params) -> (loss, metrics): with whole logits (chunk None) or in chunks."""
  tp, tcfg, _, scfg = _pair()
  tokens, segs, pos = _batch(0)
  whole = chunk is None

  def loss(sp):
    kw = dict(positions_bt=pos, segment_ids_bt=segs, return_hidden=dcfg.needs_hidden,
              logits=whole)
    s = M.forward(sp, scfg, tokens, **kw)
    t = jax.lax.stop_gradient(M.forward(tp, tcfg, tokens, **kw))
    heads = None if whole else (distill.Head(sp, scfg, chunk), distill.Head(tp, tcfg, chunk))
    return distill.distillation_loss(s, t, tokens, segs, proj, dcfg, heads=heads)
  return loss


def _assert_rel(a, b, rtol, what):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.max(np.abs(b)), 1e-30)
  assert np.max(np.abs(a - b)) <= rtol * scale, (what, np.max(np.abs(a - b)) / scale)


@pytest.mark.parametrize("dcfg,chunk", [
    (DistillConfig(ce_weight=0.3), 4),
    (DistillConfig(kl="reverse", temperature=2.0, ce_weight=0.1), 6),
    (DistillConfig(top_k=5, temperature=1.5), 1),
], ids=["forward", "reverse", "top_k"])
def test_chunked_logit_losses_equal_whole_logits_value_and_gradient(dcfg, chunk):
  sp = _pair()[2]
  (ref, ref_m), ref_g = jax.jit(jax.value_and_grad(_loss_fn(dcfg, None), has_aux=True))(sp)
  (got, got_m), got_g = jax.jit(jax.value_and_grad(_loss_fn(dcfg, chunk), has_aux=True))(sp)
  assert set(got_m) == set(ref_m)
  for k in ref_m:
    _assert_rel(got_m[k], ref_m[k], 1e-6, k)
  assert float(ref) > 0.01  # a loss far from zero, so relative error means something
  for path, g in jax.tree_util.tree_flatten_with_path(got_g)[0]:
    r = functools.reduce(lambda n, k: n[k.key], path, ref_g)
    assert float(jnp.max(jnp.abs(r))) > 0, path
    _assert_rel(g, r, 1e-6, jax.tree_util.keystr(path))


def test_chunked_losses_keep_hidden_loss_and_dynamic_alpha():
  sp = _pair()[2]
  dcfg = DistillConfig(hidden_loss="cosine", embedding_weight=0.5, ce_weight=0.1,
                       layer_map=(1,))
  proj = distill.init_projection(jax.random.key(2), 32, 64)
  (ref, ref_m), ref_g = jax.jit(jax.value_and_grad(_loss_fn(dcfg, None, proj), has_aux=True))(sp)
  (got, got_m), got_g = jax.jit(jax.value_and_grad(_loss_fn(dcfg, 5, proj), has_aux=True))(sp)
  assert {"distill/alpha", "distill/hidden"} <= set(got_m)
  for k in ref_m:
    _assert_rel(got_m[k], ref_m[k], 1e-6, k)
  for g, r in zip(jax.tree_util.tree_leaves(got_g), jax.tree_util.tree_leaves(ref_g)):
    _assert_rel(g, r, 1e-6, "grad")


def test_outputs_without_logits_need_a_head():
  tp, tcfg, _, _ = _pair()
  tokens, segs, _ = _batch(0)
  out = M.forward(tp, tcfg, tokens, logits=False)
  assert "logits" not in out and out["normed"].shape == (2, T, 64)
  with pytest.raises(ValueError, match="need a Head"):
    distill.distillation_loss(out, out, tokens, segs, None, DistillConfig())
  with pytest.raises(ValueError, match="need a Head"):
    distill.lm_loss(out, tokens, segs)


@pytest.mark.parametrize("chunk", [3])
def test_chunked_scores_and_lm_loss_equal_token_nll(chunk):
  tp, tcfg, _, _ = _pair()
  tokens, segs, pos = _batch(1)
  labels = np.roll(tokens, -1, axis=1)
  logits = M.forward(tp, tcfg, tokens)["logits"]
  nll, greedy = M.token_scores_bt(tp, tcfg, M.forward(tp, tcfg, tokens, logits=False)["normed"],
                                  labels, chunk)
  _assert_rel(nll, M.token_nll_bt(logits, labels), 1e-6, "nll")
  np.testing.assert_array_equal(greedy, np.argmax(logits, -1) == labels)

  def ce(p, whole):
    out = M.forward(p, tcfg, tokens, positions_bt=pos, segment_ids_bt=segs, logits=whole)
    return distill.lm_loss(out, tokens, segs, head=distill.Head(p, tcfg, chunk))[0]
  ref, ref_g = jax.jit(jax.value_and_grad(ce), static_argnums=1)(tp, True)
  got, got_g = jax.jit(jax.value_and_grad(ce), static_argnums=1)(tp, False)
  _assert_rel(got, ref, 1e-6, "ce")
  for g, r in zip(jax.tree_util.tree_leaves(got_g), jax.tree_util.tree_leaves(ref_g)):
    _assert_rel(g, r, 1e-6, "grad")


def test_perplexity_does_not_depend_on_the_chunk():
  tp, tcfg, _, _ = _pair()
  ids = np.random.default_rng(3).integers(0, 97, 5 * 17)
  logprobs = jax.jit(scoring.token_logprobs, static_argnums=(1, 4))
  whole = logprobs(tp, tcfg, ids[None, :-1], ids[None, 1:], 0)
  part = logprobs(tp, tcfg, ids[None, :-1], ids[None, 1:], 7)
  _assert_rel(part[0], whole[0], 1e-6, "logprobs")
  np.testing.assert_array_equal(part[1], whole[1])
  ppl = scoring.perplexity(tp, tcfg, ids, seq_len=17, batch_size=2, progress=False)
  windows = ids.reshape(5, 17)
  ref = jax.jit(lambda p: M.token_nll_bt(M.forward(p, tcfg, windows[:, :-1])["logits"],
                                         windows[:, 1:]))(tp)
  np.testing.assert_allclose(ppl["nll"], float(np.mean(ref)), rtol=1e-6)


def test_train_step_with_chunked_logits_equals_whole_logits():
  tp, tcfg, sp, scfg = _pair()
  dcfg = DistillConfig(hidden_loss="cosine", ce_weight=0.2, layer_map=(1,))
  toks, segs, pos = (x[None] for x in _batch(4))
  batch = {"tokens": toks, "segment_ids": segs, "positions": pos}
  results = []
  for chunk in (0, 4):
    cfg = train.TrainConfig(steps=2, lr=1e-3, warmup_steps=1, dtype="float32", seq_len=T,
                            global_batch_size=2, logits_chunk=chunk)
    opt = train.make_optimizer(cfg)
    state = train.init_state(sp, opt, distill.init_projection(jax.random.key(3), 32, 64))
    state, m = jax.jit(train.make_train_step(scfg, tcfg, dcfg, cfg, opt))(state, tp, batch)
    results.append((state, m))
  (s0, m0), (s1, m1) = results
  for k in m0:
    np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-5, err_msg=k)
  for x, y in zip(jax.tree_util.tree_leaves(s1["params"]), jax.tree_util.tree_leaves(s0["params"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_chunked_loss_temporary_memory_shrinks_with_the_chunk():
  """The compiled value-and-grad of KL + CE at a large vocabulary: temporaries follow the chunk
  (B x chunk x V), not the sequence (B x T x V)."""
  b, t, d, v = 2, 256, 16, 32768
  cfg = config.LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=1, num_key_value_heads=1, head_dim=16)
  dcfg = DistillConfig(ce_weight=0.5)
  shp = jax.ShapeDtypeStruct
  args = ({"final_norm": shp((d,), jnp.float32), "lm_head": shp((d, v), jnp.float32)},
          {"final_norm": shp((d,), jnp.float32), "lm_head": shp((d, v), jnp.float32)},
          shp((b, t, d), jnp.float32), shp((b, t, d), jnp.float32), shp((b, t), jnp.int32))

  def temp_bytes(chunk):
    def loss(sp, tp, s_btd, t_btd, tokens):
      heads = (distill.Head(sp, cfg, chunk), distill.Head(tp, cfg, chunk))
      return distill.distillation_loss({"normed": s_btd}, {"normed": t_btd}, tokens, None,
                                       None, dcfg, heads=heads)[0]
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 2))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  whole, c64, c16 = temp_bytes(0), temp_bytes(64), temp_bytes(16)
  logits_bytes = b * t * v * 4
  assert whole >= 2 * logits_bytes  # student and teacher logits (and more) exist whole
  assert c64 < whole / 3 and c16 < c64 / 2.5, (whole, c64, c16)
  assert c16 < logits_bytes / 2  # less than one whole (B, T, V) array
