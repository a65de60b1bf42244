"""AWQ: folding is exact in float, both searches against a numpy reference of their objective,
and neither does worse than plain round to nearest on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax import model as M
from minitron_jax.config import preset
from minitron_jax.quantize import awq
from minitron_jax.quantize import calibrate
from minitron_jax.quantize import formats as Q

F = Q.QuantFormat


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA: o is scaled too; GQA: o is skipped
def test_folded_float_model_has_the_same_logits(kv_heads):
  cfg = preset("tiny", num_hidden_layers=2, num_key_value_heads=kv_heads)
  params = M.init_params(cfg, jax.random.PRNGKey(0), std=0.1)
  rng = np.random.default_rng(0)
  widths = {"attn_in": cfg.hidden_size, "mlp_in": cfg.hidden_size,
            "mlp_act": cfg.intermediate_size, "attn_heads": cfg.num_attention_heads * cfg.head_dim}
  groups = awq.scale_groups(cfg.num_attention_heads, cfg.num_key_value_heads)
  assert ("attn_heads" in groups) == (kv_heads == cfg.num_attention_heads)
  scales = {t: rng.lognormal(0, 0.7, (2, widths[t])) for t in groups}
  folded = awq.fold_params(params, cfg, scales)
  for name in ("attn_norm", "q", "v", "o" if "attn_heads" in groups else "k", "up", "down"):
    assert not np.allclose(folded["layers"][name], params["layers"][name]), name
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 16)))
  want = np.asarray(M.forward(params, cfg, tokens)["logits"])
  got = np.asarray(M.forward(folded, cfg, tokens)["logits"])
  assert _rel(got, want) <= 1e-5
  if kv_heads != cfg.num_attention_heads:
    with pytest.raises(ValueError, match="no GQA"):
      awq.fold_params(params, cfg, {"attn_heads": np.ones((2, 64))})


def _activations(seed, fmt, out=24, inp=64, tokens=512):
  """Weights and inputs with a few outlier channels (as real LLM activations have)."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((out, inp)) * 0.05
  if not fmt.asymmetric:
    # The largest weight of a group lands on ±7.5 scales: -7.5 rounds to -8 or -7 by float
    # noise (division order), +7.5 is clipped to 7 either way; positive weights keep the
    # references free of such ties.
    w = np.abs(w)
  x = rng.standard_normal((tokens, inp)) * rng.lognormal(0, 0.5, inp)
  x[:, [5, 17, 40]] *= 20.0
  return w, x


def _group(fmt):
  return 32 if fmt.is_gguf else 16  # Q4_0's blocks are 32 wide; the others' groups are set


def _np_rtn(w, fmt, group, ratio=1.0):
  """Group round to nearest, written out per group in numpy (float64)."""
  out, inp = w.shape
  deq = np.empty_like(w)
  for o in range(out):
    for g in range(0, inp, group):
      v = w[o, g:g + group]
      r = ratio if np.ndim(ratio) == 0 else ratio[o, g // group]
      if fmt.is_gguf:  # llama.cpp: the signed largest-magnitude weight on code -8, float16 scale
        m = v[np.argmax(np.abs(v))]
        s = float(np.float16(np.float32(m) * np.float32(r) / np.float32(-8))) or 1.0
        deq[o, g:g + group] = np.clip(np.round(v / s), -8, 7) * s
      elif fmt.asymmetric:
        lo, hi = min(v.min() * r, 0.0), max(v.max() * r, 0.0)
        s = (hi - lo) / 15 or 1.0
        z = np.clip(np.round(-lo / s), 0, 15)
        deq[o, g:g + group] = (np.clip(np.round(v / s) + z, 0, 15) - z) * s
      else:
        s = np.abs(v).max() * r / 7.5 or 1.0
        deq[o, g:g + group] = np.clip(np.round(v / s), -8, 7) * s
  return deq


@pytest.mark.parametrize("fmt", awq.AWQ_FORMATS)
def test_scale_objective_equals_numpy_reference(fmt):
  w, x = _activations(0, fmt)
  h = x.T @ x
  mean_abs = np.abs(x).mean(0)
  g = _group(fmt)
  # Round to nearest with no scaling is the format's own quantizer (llama.cpp's for Q4_0).
  block = Q.block_shape(fmt, *w.shape, g)
  if fmt.is_gguf:
    values, scale, zp = Q.quantize_matrix_gguf(w, fmt)
  else:
    values, scale, zp = Q.quantize_matrix(jnp.asarray(w, jnp.float32), fmt, block)
  qa = Q.QuantizedArray(values, scale, zp, None, fmt.value, block, (24,), (64,), (0, 1))
  np.testing.assert_allclose(np.asarray(awq.fake_quant(w, fmt, g)), np.asarray(qa.matrix()),
                             atol=1e-7)
  np.testing.assert_allclose(_np_rtn(w, fmt, g), np.asarray(qa.matrix()), atol=1e-6)
  grid, (stored, _) = awq.clipped_grid(w, fmt, g)
  # Ratio 1 gives the format's scales: bit for bit llama.cpp's float16 ones for Q4_0 (the
  # int4 ones may differ in the last float32 bit, by division order).
  np.testing.assert_allclose(np.asarray(stored, np.float64), np.asarray(scale, np.float64),
                             rtol=0 if fmt.is_gguf else 1e-6)
  alphas = (0.0, 0.25, 0.5, 0.75)
  got = np.asarray(awq.scale_errors(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32),
                                    mean_abs, fmt, g, alphas))
  for a, e in zip(alphas, got):
    s = mean_abs ** a
    s = s / np.sqrt(s.max() * s.min())
    dw = _np_rtn(w * s, fmt, g) / s - w
    want = np.sum((dw @ x.T) ** 2)  # ‖ΔW X‖² from the inputs themselves, not from H
    assert abs(e - want) <= 1e-4 * want, (a, e, want)


@pytest.mark.parametrize("fmt", awq.AWQ_FORMATS)
def test_searches_never_worse_than_round_to_nearest(fmt):
  w, x = _activations(1, fmt)
  h = x.T @ x
  g = _group(fmt)
  s, errs = awq.search_scales([w, 2 * w[:8]], h, np.abs(x).mean(0), fmt, g)
  assert errs[0] == pytest.approx(sum(np.sum(((_np_rtn(v, fmt, g) - v) @ x.T) ** 2)
                                      for v in (w, 2 * w[:8])), rel=1e-4)  # α = 0: plain RTN
  assert min(errs) == errs[int(np.argmin(errs))] <= errs[0]
  assert min(errs) < 0.9 * errs[0]  # the outlier channels make scaling pay
  np.testing.assert_allclose(s, awq.channel_scales(np.abs(x).mean(0),
                                                 awq.ALPHAS[int(np.argmin(errs))]), rtol=1e-6)
  ws = w * s
  hs = h / np.outer(s, s)
  grid, (scale, zp), ratio = awq.search_clip(ws, hs, fmt, g)
  assert ratio.shape == (24, 64 // g) and ratio.min() < 1.0  # some groups are clipped
  assert set(np.unique(ratio)) <= set(np.float32(awq.clip_ratios(fmt)))
  # Per (row, group), the clipped grid's error (numpy, from the grid itself) is at most
  # round to nearest's on the unclipped one.
  deq = awq.dequantize(awq.rtn_codes(ws, grid), grid)
  np.testing.assert_allclose(deq, _np_rtn(ws, fmt, g, ratio), atol=1e-6)

  def per_group(d):
    return np.stack([np.einsum("oi,ij,oj->o", d[:, k:k + g], hs[k:k + g, k:k + g],
                               d[:, k:k + g]) for k in range(0, 64, g)], 1)

  clipped, plain = per_group(deq - ws), per_group(_np_rtn(ws, fmt, g) - ws)
  assert np.all(clipped <= plain * (1 + 1e-5) + 1e-9)
  assert clipped.sum() < plain.sum()
  assert scale.dtype == (np.float16 if fmt.is_gguf else np.float32)
  assert (zp is None) == (not fmt.asymmetric)


def test_awq_model_layout_and_checks():
  cfg = preset("tiny", num_hidden_layers=2)
  params = M.init_params(cfg, jax.random.PRNGKey(0), std=0.1)
  batches = [np.random.default_rng(k).integers(0, 256, (2, 24)) for k in range(2)]
  qp = calibrate.calibrated_params(params, cfg, F.INT4_GROUP_ASYM, batches, "awq", group_size=32)
  rtn = Q.quantize_params(params, cfg, F.INT4_GROUP_ASYM, group_size=32)
  assert jax.tree_util.tree_structure(qp) == jax.tree_util.tree_structure(rtn)
  for a, b in zip(jax.tree_util.tree_leaves(qp), jax.tree_util.tree_leaves(rtn)):
    assert a.shape == b.shape and a.dtype == b.dtype
  assert not np.allclose(qp["layers"]["attn_norm"], params["layers"]["attn_norm"])
  assert np.all(np.isfinite(np.asarray(M.forward(qp, cfg, jnp.asarray(batches[0]))["logits"])))
  with pytest.raises(ValueError, match="method=awq supports int4_group, int4_group_asym, "
                     "gguf_q4_0, not gguf_q8_0"):
    calibrate.check_method("awq", F.GGUF_Q8_0)
  with pytest.raises(ValueError, match="needs calibration data"):
    calibrate.quantize_with_method(params, cfg, F.INT4_GROUP, "awq_gptq")


def test_q4_0_clip_search_takes_the_mirrored_grid_when_it_fits():
  """Q4_0 puts a block's largest-magnitude weight on code -8, so the other sign reaches 7/8 of
  it: a block whose extremes are +1 and -0.99 is served by the mirrored grid (+1 on code +7),
  a block on the usual grid by the usual one."""
  fmt, g = F.GGUF_Q4_0, 32
  w = np.zeros((2, g))
  w[0, :2] = (1.0, -0.99)
  w[1, :4] = (1.0, 0.125, -0.25, 0.375)  # on the usual grid exactly
  _, (scale, _), ratio = awq.search_clip(w, np.eye(g), fmt, g)
  assert ratio[0, 0] == np.float32(-8 / 7) and ratio[1, 0] == 1.0
  np.testing.assert_array_equal(scale[:, 0], np.float16([1 / 7, -1 / 8]))
