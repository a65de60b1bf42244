"""GPTQ against an independent reference, and its output error against round-to-nearest."""

import numpy as np
import pytest

from minitron_jax.quantize import formats as Q
from minitron_jax.quantize import gptq

F = Q.QuantFormat


def _reference_gptq(w, h, grid, damp, act_order):
  """GPTQ as first derived (optimal brain surgeon, one weight column at a time): keep the full
  inverse Hessian of the columns not yet quantized and eliminate each quantized column from it
  by Gaussian elimination; no Cholesky factor, no blocks."""
  w, h = np.array(w, np.float64), np.array(h, np.float64)
  n = w.shape[1]
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[:, dead] = 0.0
  order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
  h = h + damp * np.mean(np.diag(h)) * np.eye(n)
  hinv = np.linalg.inv(h)
  codes = np.zeros_like(w)
  for k, j in enumerate(order):
    c = grid.codes(w[:, j], j)
    codes[:, j] = c
    err = (w[:, j] - grid.dequantize(c, j)) / hinv[j, j]
    rest = order[k + 1:]
    w[:, rest] -= np.outer(err, hinv[j, rest])
    hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
  return codes


def _layer(seed, out=48, inp=256, tokens=2048):
  """Weights and correlated, unevenly scaled inputs (like real activations), plus a dead one."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((out, inp)) * 0.05
  mix = rng.standard_normal((inp, inp)) * 0.3 + np.eye(inp)
  x = (rng.standard_normal((tokens, inp)) @ mix) * rng.lognormal(0, 1, inp)
  x[:, 3] = 0.0
  return w, x


def _dequantized(codes, grid):
  return np.stack([grid.dequantize(codes[:, j], j) for j in range(codes.shape[1])], 1)


@pytest.mark.parametrize("fmt", gptq.GPTQ_FORMATS)
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_equals_reference_and_beats_rtn(fmt, act_order):
  w, x = _layer(0)
  h = x.T @ x
  grid, (scale, zp) = gptq.format_grid(w, fmt, 64)
  got = gptq.gptq(w, h, grid, block_size=48, damp=0.01, act_order=act_order)
  want = _reference_gptq(w, h, grid, 0.01, act_order)
  assert np.mean(got == want) > 0.999, np.mean(got == want)  # float ties aside: identical
  assert got.min() >= grid.qmin and got.max() <= grid.qmax
  # The stored layout is the format's own: GPTQ codes decode through QuantizedArray.
  values = gptq.encode(got, fmt)
  q = Q.QuantizedArray(values, scale, zp, None, fmt.value, Q.block_shape(fmt, *w.shape, 64),
                       (w.shape[0],), (w.shape[1],), (0, 1))
  np.testing.assert_allclose(np.asarray(q.matrix()), _dequantized(got, grid), rtol=1e-6,
                             atol=1e-9)
  # Round-to-nearest on the same grid is the format's plain quantization.
  rtn = np.stack([grid.codes(w[:, j], j) for j in range(w.shape[1])], 1)
  if not fmt.is_gguf:  # llama.cpp rounds with the float32 scale, stores float16
    plain = Q.QuantizedArray(*Q.quantize_matrix(w.astype(np.float32), fmt, q.block), None,
                             fmt.value, q.block, q.out_dims, q.in_dims, q.perm)
    same = np.isclose(np.asarray(plain.matrix()), _dequantized(rtn, grid), rtol=1e-6,
                      atol=1e-9)
    assert np.mean(same) > 0.99  # only float32 / float64 ties at a group's max differ

  def out_err(codes):
    return np.sum(((w - _dequantized(codes, grid)) @ x.T) ** 2)

  assert out_err(got) < 0.8 * out_err(rtn)


def test_gptq_bad_inputs():
  w, x = _layer(1, inp=64)
  grid, _ = gptq.format_grid(w, F.INT4_GROUP, 32)
  with pytest.raises(ValueError, match="Hessian shape"):
    gptq.gptq(w, np.eye(32), grid)
  with pytest.raises(ValueError, match="not positive definite"):
    gptq.gptq(w, -np.eye(64), grid, damp=0.0)
