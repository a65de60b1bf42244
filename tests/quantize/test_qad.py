"""Quantization-aware distillation: fake quantization with a straight-through gradient, inside
the distillation step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax import model as M
from minitron_jax.config import preset
from minitron_jax.distill import step as train
from minitron_jax.distill.losses import DistillConfig
from minitron_jax.quantize import formats as Q
from minitron_jax.quantize import qad

F = Q.QuantFormat


def _params(seed, cfg):
  return M.init_params(cfg, jax.random.PRNGKey(seed), std=0.1)


def _dequantized(qp):
  return jax.tree_util.tree_map(lambda x: x.dequantize(jnp.float32) if Q.is_quantized(x) else x,
                                qp, is_leaf=Q.is_quantized)


@pytest.mark.parametrize("fmt", [F.INT4_GROUP_ASYM, F.FP8_BLOCK])
def test_fake_quant_values_and_straight_through_gradient(fmt):
  cfg = preset("tiny")
  params = _params(0, cfg)
  fq = qad.fake_quant_transform(cfg, fmt, group_size=32)
  got, vjp = jax.vjp(jax.jit(fq), params)
  want = _dequantized(Q.quantize_params(params, cfg, fmt, group_size=32))
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(got["layers"]["up"]), np.asarray(params["layers"]["up"]))
  cot = jax.tree_util.tree_map(
      lambda x: jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)
  (grad,) = vjp(cot)
  for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(cot)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gguf_is_refused():
  with pytest.raises(ValueError, match="qad.format: gguf_q4_0 is quantized on the host"):
    qad.check_format("gguf_q4_0")


def _batch(t=16, rows=2):
  tokens = np.random.default_rng(1).integers(3, 256, (1, rows, t)).astype(np.int32)
  return {"tokens": tokens, "segment_ids": np.ones_like(tokens),
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape).copy()}


def test_qad_step_trains_the_float_weights_on_the_quantized_model_gradient():
  """One QAD step from float weights W moves them exactly as a plain step from Q(W) moves Q(W):
  the loss and its gradient are those of the quantized student, applied to W."""
  cfg = preset("tiny")
  teacher, student = _params(0, cfg), _params(1, cfg)
  fq = qad.fake_quant_transform(cfg, F.INT4_GROUP, group_size=32)
  tcfg = train.TrainConfig(steps=2, lr=1e-3, warmup_steps=0, dtype="float32",
                           global_batch_size=2, seq_len=16)
  opt = train.make_optimizer(tcfg)
  dcfg = DistillConfig()
  batch = _batch()
  qad_step = jax.jit(train.make_train_step(cfg, cfg, dcfg, tcfg, opt, student_transform=fq))
  plain_step = jax.jit(train.make_train_step(cfg, cfg, dcfg, tcfg, opt))
  quantized = jax.jit(fq)(student)
  s1, m1 = qad_step(train.init_state(student, opt), teacher, batch)
  s2, m2 = plain_step(train.init_state(quantized, opt), teacher, batch)
  for k in m1:
    np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-5, err_msg=k)
  moved = jax.tree_util.tree_map(lambda a, b: a - b, s1["params"]["model"], student)
  moved_q = jax.tree_util.tree_map(lambda a, b: a - b, s2["params"]["model"], quantized)
  for a, b in zip(jax.tree_util.tree_leaves(moved), jax.tree_util.tree_leaves(moved_q)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert float(jnp.max(jnp.abs(moved["layers"]["up"]))) > 0


def _numpy_on_grid(w_oi, scale, zp, fmt, group):
  """Reference encoding on a given grid: nearest grid point per weight, then its value."""
  s = np.repeat(np.asarray(scale, np.float64), group, axis=-1)
  x = w_oi / s
  if fmt is F.INT4_GROUP_ASYM:
    z = np.repeat(np.asarray(zp, np.float64), group, axis=-1)
    return (np.clip(np.round(x) + z, 0, 15) - z) * s
  return np.clip(np.round(x), -8, 7) * s


@pytest.mark.parametrize("fmt", [F.INT4_GROUP, F.INT4_GROUP_ASYM])
def test_frozen_grid_keeps_a_calibrated_grid_that_rounding_would_not(fmt):
  """A grid narrower than round to nearest's (as AWQ's clipping makes): the start params sit on
  it and encode back to the same codes; the transform puts any weights on that grid (checked
  against numpy) with the identity gradient, while re-derived rounding would change the grid."""
  cfg = preset("tiny")
  params = _params(0, cfg)
  rtn = Q.quantize_params(params, cfg, fmt, group_size=32)

  def clipped(q, x, spec):  # 0.8 x the scales: every weight re-encoded on the narrower grid
    if not Q.is_quantized(q):
      return q
    narrow = dataclasses.replace(q, scale=q.scale * 0.8)
    return Q.requantize_leaf(x, spec, narrow)

  from minitron_jax import axes
  calibrated = axes.tree_from_leaves(
      (s, clipped(q, x, s)) for (s, q), (_, x) in zip(axes.iter_leaves(rtn, cfg),
                                                   axes.iter_leaves(params, cfg)))
  grid = qad.FrozenGrid(calibrated, cfg)
  start = grid.start_params()
  again = grid.encode(start)
  for (s, a), (_, b) in zip(axes.iter_leaves(again, cfg), axes.iter_leaves(calibrated, cfg)):
    if Q.is_quantized(b):
      np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values), s.name)
  rederived = Q.quantize_params(start, cfg, fmt, group_size=32)["layers"]["up"]
  assert not np.array_equal(np.asarray(rederived.scale), np.asarray(calibrated["layers"]["up"].scale))
  moved = jax.tree_util.tree_map(lambda x: x + 0.01, params)
  got, vjp = jax.vjp(jax.jit(grid.transform()), moved)
  checked = 0
  for (spec, leaf), (_, x) in zip(axes.iter_leaves(got, cfg), axes.iter_leaves(moved, cfg)):
    q = calibrated["layers"].get(spec.path[-1]) if spec.stacked else None
    if Q.is_quantized(q):  # every linear layer, in its [out, in] matrix form
      want = _numpy_on_grid(np.asarray(Q.to_matrix(x, spec), np.float64), q.scale,
                            q.zero_point, fmt, 32)
      np.testing.assert_allclose(np.asarray(Q.to_matrix(leaf, spec)), want, rtol=0, atol=1e-6)
      checked += 1
  assert checked == 7
  assert np.asarray(got["final_norm"]).tolist() == np.asarray(moved["final_norm"]).tolist()
  cot = jax.tree_util.tree_map(lambda x: jnp.full(x.shape, 0.5, x.dtype), moved)
  (g,) = vjp(cot)
  for a in jax.tree_util.tree_leaves(g):
    np.testing.assert_array_equal(np.asarray(a), 0.5)


def test_qad_reads_its_teacher_from_a_cache(tmp_path):
  """QAD distils from cached top-K logits exactly as from the live teacher's top K: the same
  losses and the same trained float weights, with the fake-quantized student in both."""
  from minitron_jax.data import corpus
  from minitron_jax.distill import run as trainer
  from minitron_jax.distill import teacher_cache as tc

  cfg = preset("tiny")
  scfg = cfg.replace(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
  teacher, student = _params(0, cfg), _params(1, scfg)
  rng = np.random.default_rng(0)
  lengths = rng.integers(5, 40, 60)
  stream = corpus.TokenStream(rng.integers(3, 256, lengths.sum()).astype(np.int32),
                              np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
  tcfg = train.TrainConfig(steps=2, global_batch_size=4, seq_len=16, lr=3e-3, warmup_steps=1,
                           dtype="float32", save_every=0, log_every=100,
                           async_checkpointing=False)
  cache = str(tmp_path / "cache")
  tc.write_for_run(cache, tcfg, teacher, cfg, stream, k=8, log=lambda s: None)
  fq = qad.fake_quant_transform(scfg, F.INT8_CHANNEL)
  common = dict(model_params=student, model_cfg=scfg, train_tokens=stream,
                student_transform=fq, log=lambda s: None)
  live = trainer.fit(tcfg, output_dir=str(tmp_path / "live"), teacher_params=teacher,
                     teacher_cfg=cfg, dcfg=DistillConfig(top_k=8), **common)
  cached = trainer.fit(tcfg, output_dir=str(tmp_path / "cached"), teacher_cfg=cfg,
                       dcfg=DistillConfig(), teacher_cache=cache, **common)
  plain = trainer.fit(tcfg, output_dir=str(tmp_path / "plain"), teacher_cfg=cfg,
                      dcfg=DistillConfig(), teacher_cache=cache,
                      **{**common, "student_transform": None})
  for a, b, c in zip(live.history, cached.history, plain.history):
    np.testing.assert_allclose(b["distill/kl"], a["distill/kl"], rtol=1e-5)
    assert abs(b["distill/kl"] - c["distill/kl"]) > 1e-6  # the cached run did quantize
  leaves = jax.tree_util.tree_leaves
  for a, b in zip(leaves(live.params), leaves(cached.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
