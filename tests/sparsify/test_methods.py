"""Sparsity masks and SparseGPT against independent numpy references."""

import numpy as np
import pytest

from minitron_jax.settings import SettingError
from minitron_jax.sparsify import methods
from minitron_jax.sparsify.methods import Pattern


def _layer(seed, out=24, inp=64, tokens=512):
  """Weights and correlated, unevenly scaled inputs, plus one dead input."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((out, inp)) * 0.05
  mix = rng.standard_normal((inp, inp)) * 0.3 + np.eye(inp)
  x = (rng.standard_normal((tokens, inp)) @ mix) * rng.lognormal(0, 1, inp)
  x[:, 5] = 0.0
  return w, x.T @ x, x


def _reference_sparsegpt(w, h, pattern, block, damp):
  """SparseGPT as optimal brain surgeon, one column at a time: the full inverse Hessian of the
  columns not yet visited, each visited column eliminated by Gaussian elimination (no
  Cholesky factor, no lazy blocks). The mask scores use `[H_{j:, j:}⁻¹]_00`, the inverse
  Hessian entry of column j once the columns before it are eliminated."""
  w, h = np.array(w, np.float64), np.array(h, np.float64)
  n = w.shape[1]
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[:, dead] = 0.0
  h = h + damp * np.mean(np.diag(h)) * np.eye(n)
  d = np.array([np.linalg.inv(h[j:, j:])[0, 0] for j in range(n)])
  hinv = np.linalg.inv(h)
  pruned = np.zeros(w.shape, bool)
  for j in range(n):
    if pattern.structured and j % pattern.m == 0:
      score = w[:, j:j + pattern.m] ** 2 / d[j:j + pattern.m]
      for r in range(w.shape[0]):
        drop = np.argsort(score[r], kind="stable")[:pattern.m - pattern.n]
        pruned[r, j + drop] = True
    if not pattern.structured and j % block == 0:
      score = (w[:, j:j + block] ** 2 / d[j:j + block]).T.reshape(-1)
      k = int(score.size * pattern.sparsity)
      flat = np.zeros(score.size, bool)
      flat[np.argsort(score, kind="stable")[:k]] = True
      pruned[:, j:j + block] = flat.reshape(-1, w.shape[0]).T
    q = np.where(pruned[:, j], 0.0, w[:, j])
    err = (w[:, j] - q) / hinv[j, j]
    w[:, j + 1:] -= np.outer(err, hinv[j, j + 1:])
    w[:, j] = q
    hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
  return w


@pytest.mark.parametrize("pattern,block", [("2:4", 16), ("4:8", 64), ("", 16)])
def test_sparsegpt_matches_reference(pattern, block):
  w, h, _ = _layer(0)
  p = Pattern.parse(pattern, 0.5)
  got = methods.sparsegpt(w, h, p, block_size=block, damp=0.01)
  want = _reference_sparsegpt(w, h, p, block, 0.01)
  np.testing.assert_array_equal(got == 0, want == 0)
  np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10)


def _groups_ok(w, n, m):
  nz = np.count_nonzero(w.reshape(w.shape[0], -1, m), axis=-1)
  return nz.max() <= n


def test_magnitude_and_wanda_masks_match_numpy():
  w, h, x = _layer(1)
  p = Pattern.parse("2:4")
  norm = np.sqrt((x ** 2).sum(0))
  for keep, score in ((methods.magnitude(w, p), np.abs(w)),
                      (methods.wanda(w, h, p), np.abs(w) * norm)):
    want = np.zeros_like(keep)
    for r in range(w.shape[0]):
      for g in range(0, w.shape[1], 4):
        top = sorted(range(4), key=lambda k: (-score[r, g + k], k))[:2]
        want[r, [g + k for k in top]] = True
    np.testing.assert_array_equal(keep, want)
  u = Pattern.parse("unstructured", 0.5)
  keep = methods.magnitude(w, u)  # one threshold over the whole matrix
  assert keep.sum() == w.size - w.size // 2
  assert np.abs(w[keep]).min() >= np.abs(w[~keep]).max()
  keep = methods.wanda(w, h, u)  # one threshold per output row
  score = np.abs(w) * norm
  for r in range(w.shape[0]):
    assert keep[r].sum() == w.shape[1] // 2
    assert score[r, keep[r]].min() >= score[r, ~keep[r]].max()


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_every_group_has_enough_zeros_and_sparsegpt_has_the_least_output_error(pattern):
  w, h, x = _layer(2)
  p = Pattern.parse(pattern)
  errs = {}
  for method in methods.METHODS:
    got = methods.prune_matrix(w, h, method, p, block_size=16)
    assert _groups_ok(got, p.n, p.m), method
    methods.check_pattern(got, p)
    errs[method] = np.linalg.norm(x @ (w - got).T)
  assert errs["sparsegpt"] < errs["wanda"] < errs["magnitude"]


def test_bad_patterns_are_refused():
  for bad in ("2-4", "4:4", "0:4", "a:b"):
    with pytest.raises(SettingError, match="pattern"):
      Pattern.parse(bad)
  with pytest.raises(SettingError, match="sparsity"):
    Pattern.parse("unstructured", 1.0)
  with pytest.raises(ValueError, match="not a multiple of M=4"):
    Pattern.parse("2:4").check_inputs("mlp.down_proj.weight", 30)
  w = np.ones((2, 8))
  with pytest.raises(ValueError, match="non-zeros"):
    methods.check_pattern(w, Pattern.parse("2:4"))
