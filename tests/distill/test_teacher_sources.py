"""One train step, two sources of teacher targets: a live teacher and cached top-K logits.

With the whole vocabulary in the cache the two steps are the same function of the student, so
loss, gradient and update must agree; and the cached step must keep the live step's memory
profile (chunked logits, no whole (B, T, V) array), checked on the compiled step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from minitron_jax import axes, config, sharding
from minitron_jax import model as M
from minitron_jax.distill import losses as distill
from minitron_jax.distill import step as train


def _init(cfg, seed):
  rng = np.random.default_rng(seed)
  return axes.tree_from_leaves(
      (s, np.ones(axes.shape(s, cfg), np.float32) if s.path[-1].endswith("norm") else
       (0.05 * rng.standard_normal(axes.shape(s, cfg))).astype(np.float32))
      for s in axes.param_specs(cfg))


def _batch(cfg, vocab, a, rows, seed=0):
  """(A, rows, T) tokens in two packed documents per row, with positions restarting."""
  rng = np.random.default_rng(seed)
  t = cfg.seq_len
  tokens = rng.integers(3, vocab, (a, rows, t)).astype(np.int32)
  cut = rng.integers(3, t - 2, (a, rows, 1))
  segs = np.where(np.arange(t) < cut, 1, 2).astype(np.int32)
  segs[..., -2:] = 0  # padding at the end of each row
  pos = np.where(segs == 2, np.arange(t) - cut, np.arange(t)).astype(np.int32)
  return {"tokens": tokens, "segment_ids": segs, "positions": pos}


def _with_topk(batch, tp, tcfg, k):
  """`batch` plus the teacher's top-k logits of each micro-batch, as a cache holds them."""
  def topk(mb):
    logits = M.forward(tp, tcfg, mb["tokens"], positions_bt=mb["positions"],
                       segment_ids_bt=mb["segment_ids"])["logits"].astype(jnp.float32)
    return jax.lax.top_k(logits, k)
  values, indices = jax.lax.map(topk, {k_: jnp.asarray(v) for k_, v in batch.items()})
  return {**batch, "topk_values": values, "topk_indices": indices}


@pytest.mark.parametrize("micro,chunk", [(None, 0), (2, 8)])
def test_cached_full_vocabulary_step_equals_the_live_step(micro, chunk):
  tcfg = config.preset("tiny")
  scfg = tcfg.replace(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
  tp, sp = _init(tcfg, 0), _init(scfg, 1)
  cfg = train.TrainConfig(global_batch_size=4, micro_batch_size=micro, seq_len=24, lr=1e-3,
                          warmup_steps=1, dtype="float32", logits_chunk=chunk)
  dcfg = distill.DistillConfig(temperature=2.0, ce_weight=0.3)
  live_batch = _batch(cfg, tcfg.vocab_size, cfg.accum_steps, cfg.micro)
  cached_batch = _with_topk(live_batch, tp, tcfg.replace(dtype="float32"), tcfg.vocab_size)
  source = train.CachedTopK(tcfg.vocab_size)

  def run(optimizer):
    state = train.init_state(sp, optimizer)
    live = jax.jit(train.make_train_step(scfg, train.LiveTeacher(tcfg), dcfg, cfg, optimizer))
    cached = jax.jit(train.make_train_step(scfg, source, dcfg, cfg, optimizer))
    return live(state, tp, live_batch), cached(state, None, cached_batch)

  # SGD at rate 1: the update is minus the gradient.
  (s_live, m_live), (s_cached, m_cached) = run(optax.sgd(1.0))
  assert float(m_live["distill/kl"]) > 1e-3  # the student does not already match
  for k in ("distill/loss", "distill/kl", "distill/ce", "train/grad_norm"):
    np.testing.assert_allclose(float(m_cached[k]), float(m_live[k]), rtol=1e-6, err_msg=k)
  p0 = jax.tree_util.tree_leaves(train.init_state(sp, optax.sgd(1.0))["params"])
  for x0, a, b in zip(p0, jax.tree_util.tree_leaves(s_live["params"]),
                      jax.tree_util.tree_leaves(s_cached["params"])):
    np.testing.assert_allclose(np.asarray(x0 - b), np.asarray(x0 - a), rtol=1e-5, atol=1e-7)
  # The run's optimizer (AdamW, clipping, schedule): the same updated params.
  (s_live, _), (s_cached, _) = run(train.make_optimizer(cfg))
  for a, b in zip(jax.tree_util.tree_leaves(s_live["params"]),
                  jax.tree_util.tree_leaves(s_cached["params"])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


def _temp_bytes(scfg, tcfg, source, cfg, dcfg) -> int:
  """Temporaries of the compiled step on one device (compile only, nothing runs)."""
  mesh = sharding.make_mesh("data:1")
  opt = train.make_optimizer(cfg)
  s_shape = jax.eval_shape(lambda: M.init_params(scfg, jax.random.key(0)))
  state_shape = jax.eval_shape(lambda p: train.init_state(p, opt), s_shape)
  state_sh = train.state_shardings(state_shape, scfg, mesh, opt)
  live = isinstance(source, train.LiveTeacher)
  t_shape = jax.eval_shape(lambda: M.init_params(tcfg, jax.random.key(1))) if live else None
  teacher_sh = sharding.param_shardings(tcfg, mesh, params=t_shape) if live else None
  step = train.make_train_step(scfg, source, dcfg, cfg, opt, grad_shardings=state_sh["params"])
  _, mem = train.compile_step(step, state_sh, teacher_sh, mesh,
                              train.abstract(state_shape, state_sh),
                              train.abstract(t_shape, teacher_sh) if live else None, cfg,
                              source)
  return mem.temp_size_in_bytes


def _small_pair(vocab):
  tcfg = config.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=16, max_position_embeddings=4096)
  return tcfg, tcfg.replace(hidden_size=16, intermediate_size=32)


def test_cached_step_temporaries_shrink_with_the_logits_chunk():
  tcfg, scfg = _small_pair(16384)
  dcfg = distill.DistillConfig(ce_weight=0.5)
  temps = {}
  for chunk in (0, 256, 64):
    cfg = train.TrainConfig(global_batch_size=1, seq_len=1024, dtype="float32",
                            logits_chunk=chunk)
    temps[chunk] = _temp_bytes(scfg, tcfg, train.CachedTopK(64), cfg, dcfg)
  whole_logits = 1024 * 16384 * 4
  assert temps[0] > whole_logits, temps
  assert temps[64] < temps[256] < temps[0] / 2, temps


def test_cached_step_temporaries_match_the_live_step_at_a_large_vocabulary():
  """T=2048 and a 49K vocabulary (SmolLM2's), batch 1: the cached step's temporaries are
  within 10% of the live step's (whose logits are chunked, student and teacher)."""
  tcfg, scfg = _small_pair(49152)
  dcfg = distill.DistillConfig()
  cfg = train.TrainConfig(global_batch_size=1, seq_len=2048, dtype="float32")
  live = _temp_bytes(scfg, tcfg, train.LiveTeacher(tcfg), cfg, dcfg)
  cached = _temp_bytes(scfg, tcfg, train.CachedTopK(64), cfg, dcfg)
  assert abs(cached - live) <= 0.1 * live, f"cached {cached} bytes, live {live} bytes"
