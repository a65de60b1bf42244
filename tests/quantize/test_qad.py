"""Quantization-aware distillation: fake quantization with a straight-through gradient, inside
the distillation step."""

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
  with pytest.raises(ValueError, match="--qad_format: gguf_q4_0 is quantized on the host"):
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
