"""Sparsity of one weight matrix: the pattern, magnitude and Wanda masks, SparseGPT.

Every matrix is `[out, in]` in HF layout; an N:M pattern keeps at most `n` of every `m`
consecutive inputs of a row (2:4 is what sparse tensor cores run), and an unstructured
pattern zeroes a fraction of the weights. The three methods differ in which weights go:

  magnitude  the smallest `|W|` (unstructured: over the whole matrix).
  wanda      the smallest `|W_ij| · ‖X_j‖₂` (Sun et al., 2023), compared within each output row
             (unstructured) or each group of `m`; `‖X_j‖₂² = H_jj` of the calibration Hessian.
  sparsegpt  SparseGPT (Frantar & Alistarh, 2023): columns are visited in order, the mask of
             each block (unstructured) or group of `m` columns (N:M) is chosen by
             `W_ij² / [H⁻¹]_jj²` of the weights *already updated*, and every pruned weight's
             error is spread over the columns not yet visited, as GPTQ spreads rounding error
             (the same upper Cholesky factor of the dampened `H⁻¹`, `gptq.inverse_hessian_factor`).

Numerics run in float64 numpy on the host, one matrix at a time.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minitron_jax.quantize import gptq
from minitron_jax.settings import SettingError

METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")


@dataclasses.dataclass(frozen=True)
class Pattern:
  """Which weights of a matrix may stay non-zero.

  Attributes:
    n, m: at most `n` non-zeros in every `m` consecutive inputs (N:M); both 0: unstructured.
    sparsity: fraction of zeros of an unstructured pattern (N:M: `1 - n / m`).
  """

  n: int = 2
  m: int = 4
  sparsity: float = 0.5

  @classmethod
  def parse(cls, pattern: str, sparsity: float = 0.5) -> "Pattern":
    """'2:4', '4:8', ... or '' / 'unstructured' (then `sparsity` is the fraction of zeros)."""
    if pattern in ("", "unstructured"):
      out = cls(0, 0, sparsity)
    else:
      try:
        n, m = (int(p) for p in pattern.split(":"))
      except ValueError:
        raise SettingError("pattern", f"{{name}}={pattern!r} is not N:M (e.g. 2:4) or "
                           "'unstructured'") from None
      out = cls(n, m, 1.0 - n / m if m > 0 else 0.0)
    out.validate()
    return out

  @property
  def structured(self) -> bool:
    return self.m > 0

  @property
  def name(self) -> str:
    return f"{self.n}:{self.m}" if self.structured else f"unstructured {self.sparsity:.0%}"

  def validate(self) -> None:
    if self.structured and not 0 < self.n < self.m:
      raise SettingError("pattern", f"{{name}}={self.n}:{self.m} needs 0 < N < M")
    if not self.structured and not 0 < self.sparsity < 1:
      raise SettingError("sparsity", f"{{name}}={self.sparsity} must lie in (0, 1)")

  def check_inputs(self, name: str, inputs: int) -> None:
    """Raises ValueError unless a matrix with `inputs` columns splits into groups of `m`."""
    if self.structured and inputs % self.m:
      raise ValueError(f"{name} has {inputs} inputs, not a multiple of M={self.m} "
                       f"({self.name} sparsity)")


def nm_keep(score_oi: np.ndarray, n: int, m: int) -> np.ndarray:
  """Keep mask with the `n` highest scores of every `m` consecutive inputs (ties: the first)."""
  out, inp = score_oi.shape
  s = score_oi.reshape(out, inp // m, m)
  order = np.argsort(-s, axis=-1, kind="stable")
  keep = np.zeros(s.shape, bool)
  np.put_along_axis(keep, order[..., :n], True, axis=-1)
  return keep.reshape(out, inp)


def lowest_keep(score: np.ndarray, sparsity: float) -> np.ndarray:
  """Keep mask zeroing the `int(size · sparsity)` lowest scores along the last axis (each row
  of a 2-D score on its own; pass a flattened score for one comparison over everything)."""
  k = int(score.shape[-1] * sparsity)
  order = np.argsort(score, axis=-1, kind="stable")
  keep = np.ones(score.shape, bool)
  np.put_along_axis(keep, order[..., :k], False, axis=-1)
  return keep


def magnitude(w_oi: np.ndarray, pattern: Pattern) -> np.ndarray:
  """Keep mask of magnitude pruning (unstructured: the smallest `|W|` of the whole matrix)."""
  score = np.abs(np.asarray(w_oi, np.float64))
  if pattern.structured:
    return nm_keep(score, pattern.n, pattern.m)
  return lowest_keep(score.reshape(-1), pattern.sparsity).reshape(score.shape)


def wanda(w_oi: np.ndarray, h_ii: np.ndarray, pattern: Pattern) -> np.ndarray:
  """Keep mask of Wanda: score `|W_ij| · sqrt(H_jj)`, compared per output row."""
  score = np.abs(np.asarray(w_oi, np.float64)) * np.sqrt(np.maximum(np.diag(h_ii), 0.0))
  if pattern.structured:
    return nm_keep(score, pattern.n, pattern.m)
  return lowest_keep(score, pattern.sparsity)


def sparsegpt(w_oi: np.ndarray, h_ii: np.ndarray, pattern: Pattern, *, block_size: int = 128,
              damp: float = 0.01) -> np.ndarray:
  """SparseGPT: the pruned and updated `[out, in]` weights (float64).

  Args:
    w_oi: `[out, in]` float weights.
    h_ii: `[in, in]` Hessian `X Xᵀ` of the layer's inputs.
    pattern: N:M (masks chosen per group of `m` columns) or unstructured (per block).
    block_size: columns per lazy-update block; for unstructured patterns also the columns
      whose mask is chosen together (changes the result there, as in the paper's code).
    damp: added to the Hessian's diagonal as a fraction of its mean.
  """
  if pattern.structured and block_size % pattern.m:
    raise ValueError(f"block_size={block_size} must be a multiple of M={pattern.m}")
  w, h = gptq.checked_copies(w_oi, h_ii)
  n = w.shape[1]
  hinv_u = gptq.inverse_hessian_factor(h, damp)
  d2 = np.diag(hinv_u) ** 2
  wt = np.ascontiguousarray(w.T)  # rows are input columns, as in `gptq.gptq`
  for i1 in range(0, n, block_size):
    i2 = min(i1 + block_size, n)
    w1 = wt[i1:i2].copy()
    err1 = np.empty_like(w1)
    pruned = np.zeros(w1.shape, bool)
    if not pattern.structured:
      pruned = ~lowest_keep((w1 ** 2 / d2[i1:i2, None]).reshape(-1),
                            pattern.sparsity).reshape(w1.shape)
    for i in range(i2 - i1):
      k = i1 + i
      if pattern.structured and i % pattern.m == 0:
        score = (w1[i:i + pattern.m] ** 2 / d2[k:k + pattern.m, None]).T
        pruned[i:i + pattern.m] = ~nm_keep(score, pattern.n, pattern.m).T
      q = np.where(pruned[i], 0.0, w1[i])
      e = (w1[i] - q) / hinv_u[k, k]
      w1[i:] -= hinv_u[k, k:i2, None] * e[None]
      w1[i] = q
      err1[i] = e
    wt[i1:i2] = w1
    wt[i2:] -= hinv_u[i1:i2, i2:].T @ err1
  return wt.T.copy()


def prune_matrix(w_oi: np.ndarray, h_ii: np.ndarray | None, method: str, pattern: Pattern, *,
                 block_size: int = 128, damp: float = 0.01) -> np.ndarray:
  """The pruned `[out, in]` weights (float64) of one matrix by `method`."""
  if method == "sparsegpt":
    return sparsegpt(w_oi, h_ii, pattern, block_size=block_size, damp=damp)
  keep = magnitude(w_oi, pattern) if method == "magnitude" else wanda(w_oi, h_ii, pattern)
  return np.where(keep, np.asarray(w_oi, np.float64), 0.0)


def check_pattern(w_oi: np.ndarray, pattern: Pattern) -> None:
  """Raises ValueError if `w_oi` has more non-zeros than `pattern` allows in any group (N:M)."""
  if not pattern.structured:
    return
  out, inp = w_oi.shape
  nz = np.count_nonzero(np.asarray(w_oi).reshape(out, inp // pattern.m, pattern.m), axis=-1)
  if nz.max(initial=0) > pattern.n:
    raise ValueError(f"a group of {pattern.m} has {nz.max()} non-zeros (> {pattern.n})")
