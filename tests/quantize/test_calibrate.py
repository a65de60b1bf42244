"""Layer-by-layer GPTQ of a whole model: the layout of round-to-nearest, Hessians taken behind
already-quantized layers, and lower output error than round-to-nearest on real activations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax import axes
from minitron_jax import model as M
from minitron_jax.config import preset
from minitron_jax.quantize import calibrate
from minitron_jax.quantize import formats as Q
from minitron_jax.quantize import gptq

F = Q.QuantFormat
SPECS = {s.path[-1]: s for s in axes.PARAM_SPECS}


def _tiny():
  cfg = preset("tiny", num_hidden_layers=3)
  return M.init_params(cfg, jax.random.PRNGKey(0), std=0.1), cfg


def _dequantized(qp):
  return jax.tree_util.tree_map(lambda x: x.dequantize(jnp.float32) if Q.is_quantized(x) else x,
                                qp, is_leaf=Q.is_quantized)


def _gram(x):
  x = x.reshape(x.shape[0] * x.shape[1], -1).astype(jnp.float32)
  return x.T @ x


@pytest.mark.parametrize("fmt", [F.GGUF_Q4_0])
def test_each_layer_sees_the_quantized_layers_before_it(fmt):
  params, cfg = _tiny()
  batches = [np.random.default_rng(k).integers(0, 256, (2, 24)) for k in range(2)]
  qp = calibrate.calibrated_params(params, cfg, fmt, batches, "gptq", group_size=32)
  rtn = Q.quantize_params(params, cfg, fmt, group_size=32)
  assert jax.tree_util.tree_structure(qp) == jax.tree_util.tree_structure(rtn)
  for a, b in zip(jax.tree_util.tree_leaves(qp), jax.tree_util.tree_leaves(rtn)):
    assert a.shape == b.shape and a.dtype == b.dtype
  # Reference for layer 2: the whole-model forward on layers 0-1 as quantized and layer 2 in
  # float gives layer 2's inputs; GPTQ on their Hessians gives the same codes.
  mixed = _dequantized(qp)
  mixed["layers"] = jax.tree_util.tree_map(lambda q, f: q.at[2].set(f[2]), mixed["layers"],
                                           params["layers"])
  taps = {t: _gram for t in set(Q.INPUT_TAPS.values())}
  hess = None
  for b in batches:
    got = M.forward(mixed, cfg, jnp.asarray(b), taps=taps)["taps"]
    hess = got if hess is None else jax.tree_util.tree_map(jnp.add, hess, got)
  for name in ("q", "o", "up", "down"):
    spec = SPECS[name]
    w = np.asarray(Q.to_matrix(params["layers"][name], spec))[2]
    values, scale, _ = gptq.quantize_matrix(w, np.asarray(hess[Q.INPUT_TAPS[name]][2], np.float64),
                                            fmt, group_size=32)
    got = np.asarray(qp["layers"][name].int_values()[2])
    want = np.asarray(Q.unpack_int4(jnp.asarray(values), w.shape[1]))
    assert np.mean(got == want) > 0.99, name
    np.testing.assert_array_equal(np.asarray(qp["layers"][name].scale[2]), scale)
  # and GPTQ's dequantized model runs like any quantized one
  logits = M.forward(qp, cfg, jnp.asarray(batches[0]))["logits"]
  assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("fmt", [F.FP8_CHANNEL, F.FP8_BLOCK])
def test_fp8_gptq_with_static_activation_scales(fmt):
  """FP8 GPTQ keeps the static input scales, and each layer's Hessian comes from the earlier
  layers as deployed: FP8 weights and FP8-rounded activations."""
  params, cfg = _tiny()
  batches = [np.random.default_rng(k).integers(0, 256, (2, 24)) for k in range(2)]
  act = Q.calibrate_activation_scales(params, cfg, batches)
  qp = calibrate.calibrated_params(params, cfg, fmt, batches, "gptq", activation_scales=act)
  for name, tap in Q.INPUT_TAPS.items():
    leaf = qp["layers"][name]
    assert leaf.values.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(leaf.input_scale), np.asarray(act[tap]))
  # Reference for layer 1's q / k / v: the whole-model forward of layers 0-1 as exported
  # (the attn_in tap of layer 1 reads layer 0's output only).
  two = cfg.replace(num_hidden_layers=2)
  few = dict(qp, layers=jax.tree_util.tree_map(lambda a: a[:2], qp["layers"]))
  plain = dict(few, layers={k: (dataclasses.replace(v, input_scale=None) if Q.is_quantized(v)
                                else v) for k, v in few["layers"].items()})

  def hessian(p):
    h = [M.forward(p, two, jnp.asarray(b), taps={"attn_in": _gram})["taps"]["attn_in"][1]
         for b in batches]
    return np.asarray(sum(h), np.float64)

  h, h_weights_only = hessian(few), hessian(plain)
  assert not np.allclose(h, h_weights_only, rtol=1e-4)  # the activation rounding is seen
  for name in ("q", "k", "v"):
    w = np.asarray(Q.to_matrix(params["layers"][name], SPECS[name]))[1]
    values, scale, _ = gptq.quantize_matrix(w, h, fmt)
    got = np.asarray(qp["layers"][name].values[1], np.float32)
    assert np.mean(got == np.asarray(values, np.float32)) > 0.99, name
    np.testing.assert_array_equal(np.asarray(qp["layers"][name].scale[1]), scale)
  with pytest.raises(ValueError, match="FP8 only"):
    calibrate.calibrated_params(params, cfg, F.INT8_CHANNEL, batches, "gptq", activation_scales=act)


def test_default_method_is_the_best_one_the_format_supports():
  assert [calibrate.default_method(f, True) for f in F] == [
      "awq_gptq" if f in (F.INT4_GROUP, F.INT4_GROUP_ASYM, F.GGUF_Q4_0) else
      "gptq" if f in gptq.GPTQ_FORMATS else "rtn" for f in F]
  assert {calibrate.default_method(f, False) for f in F} == {"rtn"}
  for f in F:  # every default passes the method check
    calibrate.check_method(calibrate.default_method(f, True), f)


def test_method_checks():
  with pytest.raises(ValueError, match="method='awq2' is not a quantization method"):
    calibrate.check_method("awq2", F.INT4_GROUP)
  with pytest.raises(ValueError, match="method=awq supports .* not fp8_block"):
    calibrate.check_method("awq", F.FP8_BLOCK)
  params, cfg = _tiny()
  with pytest.raises(ValueError, match="needs calibration data"):
    calibrate.quantize_with_method(params, cfg, F.INT4_GROUP, "gptq")
  with pytest.raises(ValueError, match="at least one batch"):
    calibrate.calibrated_params(params, cfg, F.INT4_GROUP, [], "gptq")


@pytest.mark.slow
def test_gptq_beats_rtn_on_real_activations(real_model):
  """Output error ‖(W - Ŵ)X‖² = tr((W - Ŵ) H (W - Ŵ)ᵀ) on SmolLM2-135M's own activations."""
  params, cfg, tok = real_model
  text = ("The history of the city begins in the Roman period, when a small fort was built "
          "on the river. Over the following centuries it grew into a market town, and by the "
          "eighteenth century its mills and docks employed thousands of workers. ") * 12
  ids = jnp.asarray([tok(text)["input_ids"][:256]])
  few = dict(params, layers=jax.tree_util.tree_map(lambda a: a[:2], params["layers"]))
  taps = {t: _gram for t in set(Q.INPUT_TAPS.values())}
  hess = M.forward(few, cfg.replace(num_hidden_layers=2), ids, taps=taps)["taps"]
  for fmt in (F.INT4_GROUP, F.GGUF_Q4_0):
    for name in ("q", "down"):
      w = np.asarray(Q.to_matrix(params["layers"][name], SPECS[name]), np.float64)[1]
      h = np.asarray(hess[Q.INPUT_TAPS[name]][1], np.float64)
      grid, _ = gptq.format_grid(w, fmt)
      rtn = np.stack([grid.codes(w[:, j], j) for j in range(w.shape[1])], 1)
      opt = gptq.gptq(w, h, grid)

      def err(codes):
        d = w - np.stack([grid.dequantize(codes[:, j], j) for j in range(w.shape[1])], 1)
        return np.trace(d @ h @ d.T)

      assert err(opt) < 0.7 * err(rtn), (fmt, name, err(opt) / err(rtn))
