"""GPTQ: Hessian-aware rounding of one weight matrix onto a fixed grid (integer or FP8).

GPTQ (Frantar et al., 2022) quantizes the input columns of `W` (`[out, in]`, HF layout) one at
a time and spreads each column's rounding error over the columns not yet quantized, weighted
by the inverse Hessian `H = 2 X Xᵀ` of the layer's calibration inputs, so that `‖(W - Ŵ) X‖²`
stays small rather than `‖W - Ŵ‖²`. This is the blocked form with the upper Cholesky factor
of `H⁻¹` (lazy batch updates), with act-order (columns by decreasing `H_jj`) and dampening.

The grid (scales, zero points) is fixed before the search, from the float weights by the
format's own round-to-nearest rule ("static groups"): act-order then needs no group
bookkeeping, the exported layout is the format's usual one (groups of consecutive inputs,
llama.cpp's 32-input Q4_0 blocks with their float16 scales, FP8's per-tensor, per-channel or
128 x 128 block scales), and GPTQ changes only which grid point each weight takes. For FP8 the
grid points of a scale are the float8_e4m3fn values times it: not evenly spaced, but GPTQ only
needs the nearest point of each column, and the error it spreads is what that rounding left.

Numerics run in float64 numpy on the host: one matrix at a time, a few `in × in` factorisations
and `in` rank-one updates, cheap next to the forward passes that collect `H`.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import scipy.linalg

from minitron_jax.quantize import formats as Q

GPTQ_FORMATS = (Q.QuantFormat.FP8_TENSOR, Q.QuantFormat.FP8_CHANNEL, Q.QuantFormat.FP8_BLOCK,
                Q.QuantFormat.INT8_CHANNEL, Q.QuantFormat.INT4_GROUP,
                Q.QuantFormat.INT4_GROUP_ASYM, Q.QuantFormat.GGUF_Q8_0,
                Q.QuantFormat.GGUF_Q4_0)


@dataclasses.dataclass(frozen=True)
class Grid:
  """Grid of one `[out, in]` matrix: value = (code - zero) * scale per element.

  Attributes:
    scale: `(out, groups)` float64, one per `(1, group)` block of inputs.
    zero: `(out, groups)` float64 zero points (asymmetric), or None (zero is 0).
    group: inputs per scale.
    qmin, qmax: code range.
    fp8: codes are float8_e4m3fn values (in [qmin, qmax] = ±448), not integers.
  """

  scale: np.ndarray
  zero: np.ndarray | None
  group: int
  qmin: int
  qmax: int
  fp8: bool = False

  def snap(self, v: np.ndarray) -> np.ndarray:
    """The nearest code to each scaled value `v` (zero point added), clipped to the range."""
    v = np.clip(v, self.qmin, self.qmax)
    if self.fp8:  # round to nearest even, as the float8 cast of the export
      return v.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return np.rint(v)

  def column(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero) of input column `j`, each `(out,)`."""
    g = j // self.group
    z = self.zero[:, g] if self.zero is not None else np.zeros(self.scale.shape[0])
    return self.scale[:, g], z

  def codes(self, w_o: np.ndarray, j: int) -> np.ndarray:
    """Nearest codes of column `j`'s values `w_o`."""
    s, z = self.column(j)
    return self.snap(w_o / s + z)

  def dequantize(self, c_o: np.ndarray, j: int) -> np.ndarray:
    s, z = self.column(j)
    return (c_o - z) * s


def format_grid(w_oi: np.ndarray, fmt: Q.QuantFormat, group_size: int = Q.DEFAULT_GROUP_SIZE
                ) -> tuple[Grid, tuple[np.ndarray, np.ndarray | None]]:
  """The grid `fmt` puts `w_oi` on by round-to-nearest, and its stored (scale, zero point).

  Returns:
    (grid, (scale, zero_point or None) as `QuantizedArray` stores them).
  """
  if fmt not in GPTQ_FORMATS:
    raise ValueError(f"GPTQ supports {', '.join(f.value for f in GPTQ_FORMATS)}; got "
                     f"{fmt.value}")
  out, inp = w_oi.shape
  block = Q.block_shape(fmt, out, inp, group_size)
  if fmt.is_gguf:
    _, scale, zp = Q.quantize_matrix_gguf(np.asarray(w_oi, np.float32), fmt)
  else:
    _, scale, zp = Q.quantize_matrix(np.asarray(w_oi, np.float32), fmt, block)
  s = np.asarray(scale, np.float64)
  if fmt.kind == "fp8":  # block scales `(out / block_out, in / block_in)` -> one row each
    s = np.repeat(s, block[0], axis=0)[:out]
    grid = Grid(s, None, block[1], -Q.FP8_MAX, Q.FP8_MAX, fp8=True)
  elif fmt.asymmetric:
    grid = Grid(s, np.asarray(zp, np.float64), block[1], 0, 15)
  elif fmt.kind == "int8":
    grid = Grid(s, None, block[1], -127, 127)
  else:
    grid = Grid(s, None, block[1], -8, 7)
  return grid, (np.asarray(scale), None if zp is None else np.asarray(zp))


def checked_copies(w_oi: np.ndarray, h_ii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float64 copies of `[out, in]` weights and their `[in, in]` Hessian, checked, with inputs
  that were never active (zero diagonal) made harmless: their weights are zeroed (they cannot
  matter) and their diagonal set to 1 (so the Hessian stays invertible)."""
  w = np.array(w_oi, np.float64)
  h = np.array(h_ii, np.float64)
  n = w.shape[1]
  if h.shape != (n, n):
    raise ValueError(f"Hessian shape {h.shape} does not match {n} inputs")
  if not np.all(np.isfinite(h)):
    raise ValueError("the Hessian has non-finite entries")
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[:, dead] = 0.0
  return w, h


def gptq(w_oi: np.ndarray, h_ii: np.ndarray, grid: Grid, *, block_size: int = 128,
         damp: float = 0.01, act_order: bool = True) -> np.ndarray:
  """GPTQ codes of `w_oi` on `grid`, minimising `tr((W - Ŵ) H (W - Ŵ)ᵀ)`.

  Args:
    w_oi: `[out, in]` float weights.
    h_ii: `[in, in]` Hessian `X Xᵀ` (any positive factor) of the layer's inputs.
    grid: from `format_grid`.
    block_size: columns per lazy-update block (changes speed only).
    damp: added to the diagonal, as a fraction of its mean.
    act_order: quantize columns by decreasing `H_jj` (largest input energy first).

  Returns:
    `[out, in]` float64 codes in `[grid.qmin, grid.qmax]` (integers, or FP8 values).
  """
  w, h = checked_copies(w_oi, h_ii)
  n = w.shape[1]
  order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
  w, h = w[:, order], h[np.ix_(order, order)]
  hinv_u = inverse_hessian_factor(h, damp)
  # Rows of the transposed matrices are input columns: contiguous updates, per-row scales.
  wt = np.ascontiguousarray(w.T)
  s_t = np.repeat(grid.scale, grid.group, axis=1)[:, :n].T[order]
  z_t = (np.zeros_like(s_t) if grid.zero is None else
         np.repeat(grid.zero, grid.group, axis=1)[:, :n].T[order])
  codes = np.empty_like(wt)
  for i1 in range(0, n, block_size):
    i2 = min(i1 + block_size, n)
    w1 = wt[i1:i2].copy()
    err1 = np.empty_like(w1)
    for i in range(i2 - i1):
      k = i1 + i
      c = grid.snap(w1[i] / s_t[k] + z_t[k])
      codes[k] = c
      e = (w1[i] - (c - z_t[k]) * s_t[k]) / hinv_u[k, k]
      w1[i + 1:] -= hinv_u[k, k + 1:i2, None] * e[None]
      err1[i] = e
    wt[i2:] -= hinv_u[i1:i2, i2:].T @ err1
  out = np.empty_like(w)
  out[:, order] = codes.T
  return out


def inverse_hessian_factor(h_ii: np.ndarray, damp: float) -> np.ndarray:
  """Upper Cholesky factor `U` of `(H + λI)⁻¹` (`UᵀU = (H + λI)⁻¹`), λ = damp · mean diag(H).

  Row `j` of `U` divided by `U_jj` is row `j` of the inverse Hessian after eliminating the
  columns before `j`: exactly the update GPTQ applies when column `j` is quantized.
  """
  if damp < 0:
    raise ValueError(f"damp must be >= 0, got {damp}")
  h = h_ii + damp * np.mean(np.diag(h_ii)) * np.eye(len(h_ii))
  try:
    # H = V Vᵀ with V upper (the Cholesky factor of H with its order reversed), so
    # H⁻¹ = V⁻ᵀ V⁻¹ and U = V⁻¹: one factorisation and one triangular inverse.
    upper = np.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
    return scipy.linalg.solve_triangular(upper, np.eye(len(h)), lower=False)
  except np.linalg.LinAlgError:
    raise ValueError(f"the damped Hessian is not positive definite (damp={damp}); raise the "
                     f"dampening") from None


def encode(codes_oi: np.ndarray, fmt: Q.QuantFormat) -> np.ndarray:
  """Codes -> `QuantizedArray.values` storage (float8, int8, or packed int4 nibbles)."""
  if fmt.kind == "fp8":
    return np.asarray(codes_oi).astype(ml_dtypes.float8_e4m3fn)  # exact: codes are FP8 values
  c = np.asarray(codes_oi).astype(np.int16)
  if fmt.kind == "int8":
    return c.astype(np.int8)
  return np.asarray(Q.pack_int4(c + (0 if fmt.asymmetric else 8)))


def quantize_matrix(w_oi: np.ndarray, h_ii: np.ndarray, fmt: Q.QuantFormat, *,
                    group_size: int = Q.DEFAULT_GROUP_SIZE, **kw):
  """GPTQ of one matrix in `fmt`: (values, scale, zero point) as `QuantizedArray` stores them.

  Keyword arguments go to `gptq`.
  """
  grid, (scale, zp) = format_grid(w_oi, fmt, group_size)
  return encode(gptq(w_oi, h_ii, grid, **kw), fmt), scale, zp
