"""AWQ: activation-aware per-input-channel scales and clipping for the INT4 formats (the group
formats and llama.cpp's Q4_0).

AWQ (Lin et al., 2023) multiplies each input channel `j` of a group of linear layers that read
one activation by `s_j` and divides the activation by `s_j`, so the product is unchanged in
float while the channels that carry large activations get finer rounding. The division is
folded into whatever produces the activation, so the exported checkpoint keeps the format's
usual layout and consumers need nothing new:

  q, k, v   behind input_layernorm            -> the norm's weight / s
  gate, up  behind post_attention_layernorm   -> the norm's weight / s
  down      behind silu(gate) * up            -> up's output rows / s
  o         behind the attention of v         -> v's output rows / s (no GQA only: with
                                                 shared KV heads a v row feeds several o
                                                 inputs, so AutoAWQ skips o, as we do)

Gemma's (1 + w) norms take the division as (1 + w') = (1 + w) / s, and Qwen2's v bias is
divided with v's rows; both stay exact in float. Gemma calls the MLP's input norm
pre_feedforward_layernorm (our `mlp_norm` either way).

`s = mean|x| ** α` (normalised by the geometric mean of its extremes), with α searched on a
grid in [0, 1). Each weight's grid is then clipped: per output row and group, the range is
shrunk by a ratio from a grid, keeping the ratio of least output error. Both searches score
the exact output error of the calibration inputs from their Hessian `H = X Xᵀ`:
`‖ΔW X‖² = tr(ΔW H ΔWᵀ)`, the clip search with the group's diagonal block of `H`. α = 0 and
ratio 1 (round to nearest on the format's own grid) are on the grids, so neither search can
do worse than plain rounding on its objective.

Both searches run jitted (every α or ratio of one matrix in one call, float32); the chosen grid
and the folding are numpy float64, one layer's matrices at a time (see `calibrate.py` for the
layer loop that feeds it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.quantize import formats as Q
from minitron_jax.quantize import gptq

AWQ_FORMATS = (Q.QuantFormat.INT4_GROUP, Q.QuantFormat.INT4_GROUP_ASYM, Q.QuantFormat.GGUF_Q4_0)
ALPHAS = tuple(np.arange(20) / 20)             # AutoAWQ's n_grid = 20
CLIP_RATIOS = tuple(1.0 - np.arange(10) / 20)  # 1.0 down to 0.55 (AutoAWQ: max_shrink 0.5)
# Q4_0 maps a block's largest-magnitude weight m to code -8 (scale m / -8), so the other sign
# reaches only 7/8 of |m|. Its ratios also try the mirrored grid, m on code +7 (scale m / 7,
# ratio -8/7), which serves blocks whose extremes of both signs are close.
GGUF_CLIP_RATIOS = CLIP_RATIOS + tuple(-8 / 7 * r for r in CLIP_RATIOS)


def clip_ratios(fmt: Q.QuantFormat) -> tuple:
  """The range ratios `search_clip` tries for `fmt` (1.0 first: the format's own grid)."""
  return GGUF_CLIP_RATIOS if fmt.is_gguf else CLIP_RATIOS

# Activation (tap) -> (linears reading it, (producer, 'norm' or 'rows') the division folds into).
SCALE_GROUPS = {"attn_in": (("q", "k", "v"), ("attn_norm", "norm")),
                "mlp_in": (("gate", "up"), ("mlp_norm", "norm")),
                "mlp_act": (("down",), ("up", "rows")),
                "attn_heads": (("o",), ("v", "rows"))}


def scale_groups(num_heads: int, num_kv_heads: int) -> dict:
  """`SCALE_GROUPS` of a model: without 'attn_heads' under grouped-query attention."""
  if num_heads == num_kv_heads:
    return dict(SCALE_GROUPS)
  return {k: v for k, v in SCALE_GROUPS.items() if k != "attn_heads"}


# ---------------------------------------------------------------------------- grids


def _range(w_ogk: np.ndarray, fmt: Q.QuantFormat, r_og) -> tuple[np.ndarray, np.ndarray]:
  """(scale, zero point) `(out, groups)` float32 of grouped weights with ranges shrunk by
  `r_og`; ratio 1 is `formats.quantize_matrix`'s rule (symmetric `amax / 7.5` on codes
  [-8, 7]; asymmetric `(max - min) / 15` with a zero point on [0, 15]), or llama.cpp's for
  Q4_0 (the signed largest-magnitude weight `/ -8`, stored as float16, on codes [-8, 7])."""
  if fmt.is_gguf:
    m = np.take_along_axis(w_ogk, np.abs(w_ogk).argmax(-1)[..., None], -1)[..., 0]
    d = (m * r_og / np.float32(-8.0)).astype(np.float16).astype(np.float32)
    return np.where(d != 0, d, np.float32(1.0)), np.zeros((), np.float32)
  if fmt.asymmetric:
    lo = np.minimum(w_ogk.min(-1) * r_og, 0.0)
    hi = np.maximum(w_ogk.max(-1) * r_og, 0.0)
    scale = _safe((hi - lo) / np.float32(15.0))
    return scale, np.clip(np.round(-lo / scale), 0, 15).astype(np.float32)
  return _safe(np.abs(w_ogk).max(-1) * r_og / np.float32(7.5)), np.zeros((), np.float32)


def _safe(scale: np.ndarray) -> np.ndarray:
  return np.where(scale > 0, scale, 1.0).astype(np.float32)


def _grouped(w_oi: np.ndarray, fmt: Q.QuantFormat, group: int) -> np.ndarray:
  if fmt not in AWQ_FORMATS:
    raise ValueError(f"AWQ supports {', '.join(f.value for f in AWQ_FORMATS)}, not {fmt.value}")
  out, inp = w_oi.shape
  if inp % group:
    raise ValueError(f"group {group} does not divide {inp} inputs")
  return np.asarray(w_oi, np.float32).reshape(out, inp // group, group)


def clipped_grid(w_oi: np.ndarray, fmt: Q.QuantFormat, group: int,
                 ratio_og: np.ndarray | float = 1.0) -> tuple[gptq.Grid, tuple]:
  """The INT4 grid of `w_oi` with each (row, group) range shrunk by `ratio_og`.

  Ratio 1 is the format's own round-to-nearest grid (`formats.quantize_matrix`, or
  `formats.quantize_matrix_gguf` for Q4_0).

  Returns:
    (grid, (scale `(out, groups)`: float32, float16 for Q4_0; zero point uint8 or None) as
    stored).
  """
  scale, zp = _range(_grouped(w_oi, fmt, group), fmt, np.float32(1.0) * ratio_og)
  if fmt.is_gguf:
    return gptq.Grid(scale.astype(np.float64), None, group, -8, 7), (scale.astype(np.float16), None)
  if fmt.asymmetric:
    return (gptq.Grid(scale.astype(np.float64), zp.astype(np.float64), group, 0, 15),
            (scale, zp.astype(np.uint8)))
  return gptq.Grid(scale.astype(np.float64), None, group, -8, 7), (scale, None)


def rtn_codes(w_oi: np.ndarray, grid: gptq.Grid) -> np.ndarray:
  """Nearest codes of every weight on `grid`, `(out, in)` float64."""
  s, z = _expand(grid, w_oi.shape[1])
  return np.clip(np.rint(w_oi / s) + z, grid.qmin, grid.qmax)


def dequantize(codes_oi: np.ndarray, grid: gptq.Grid) -> np.ndarray:
  s, z = _expand(grid, codes_oi.shape[1])
  return (codes_oi - z) * s


def _expand(grid: gptq.Grid, n: int) -> tuple[np.ndarray, np.ndarray]:
  s = np.repeat(grid.scale, grid.group, axis=1)[:, :n]
  z = 0.0 if grid.zero is None else np.repeat(grid.zero, grid.group, axis=1)[:, :n]
  return s, z


# ---------------------------------------------------------------------------- objectives


def channel_scales(mean_abs_i, alpha):
  """AWQ's `s = mean|x| ** α`, floored at 1e-4 and divided by `sqrt(max · min)`."""
  s = jnp.maximum(jnp.asarray(mean_abs_i, jnp.float32) ** alpha, 1e-4)
  return s / jnp.sqrt(s.max() * s.min())


def fake_quant(w_oi, fmt: Q.QuantFormat, group: int, ratio_og=1.0) -> jax.Array:
  """Round to nearest on the grid of `clipped_grid(w_oi, fmt, group, ratio_og)`, dequantized
  (float32, jnp)."""
  out, inp = w_oi.shape
  w = jnp.asarray(w_oi, jnp.float32).reshape(out, inp // group, group)
  r = jnp.asarray(ratio_og, jnp.float32)
  if fmt.is_gguf:
    m = jnp.take_along_axis(w, jnp.abs(w).argmax(-1)[..., None], -1)[..., 0]
    d = (m * r / -8.0).astype(jnp.float16).astype(jnp.float32)
    scale, zp = jnp.where(d != 0, d, 1.0), jnp.zeros((), jnp.float32)
    qmin, qmax = -8, 7
  elif fmt.asymmetric:
    lo = jnp.minimum(w.min(-1) * r, 0.0)
    hi = jnp.maximum(w.max(-1) * r, 0.0)
    scale = _safe_j((hi - lo) / 15.0)
    zp = jnp.clip(jnp.round(-lo / scale), 0, 15)
    qmin, qmax = 0, 15
  else:
    scale, zp = _safe_j(jnp.abs(w).max(-1) * r / 7.5), jnp.zeros((), jnp.float32)
    qmin, qmax = -8, 7
  q = jnp.clip(jnp.round(w / scale[..., None]) + zp[..., None], qmin, qmax)
  return ((q - zp[..., None]) * scale[..., None]).reshape(out, inp)


def _safe_j(scale):
  return jnp.where(scale > 0, scale, 1.0)


@functools.partial(jax.jit, static_argnums=(3, 4))
def scale_errors(w_oi, h_ii, mean_abs_i, fmt: Q.QuantFormat, group: int, alphas) -> jax.Array:
  """Per α: output error of round to nearest on `W diag(s)`, scaled back by `1 / s`."""
  def one(alpha):
    s = channel_scales(mean_abs_i, alpha)
    dw = fake_quant(w_oi * s, fmt, group) / s - w_oi
    return jnp.sum((dw @ h_ii) * dw)
  return jax.lax.map(one, jnp.asarray(alphas, jnp.float32))


@functools.partial(jax.jit, static_argnums=(2, 3))
def clip_errors(w_oi, h_ii, fmt: Q.QuantFormat, group: int, ratios) -> jax.Array:
  """`(ratios, out, groups)`: per (row, group) `Δw_g H_gg Δw_gᵀ` (the output error of each
  group's weights alone; cross-group terms left out) under round to nearest with the range
  shrunk by each ratio."""
  out, inp = w_oi.shape
  n = inp // group
  idx = jnp.arange(n)
  h_gkk = h_ii.reshape(n, group, n, group)[idx, :, idx, :]

  def one(r):
    d_ogk = (fake_quant(w_oi, fmt, group, r) - w_oi).reshape(out, n, group)
    return jnp.einsum("ogi,gij,ogj->og", d_ogk, h_gkk, d_ogk)
  return jax.lax.map(one, jnp.asarray(ratios, jnp.float32))


def search_scales(ws_oi: list[np.ndarray], h_ii: np.ndarray, mean_abs_i: np.ndarray,
                  fmt: Q.QuantFormat, group: int, alphas=ALPHAS) -> tuple[np.ndarray, np.ndarray]:
  """The per-input-channel scales of least output error (`scale_errors` summed over the
  linears reading one input) over `alphas`.

  Returns:
    (scales `(in,)` float64, the objective at each α).
  """
  _check(fmt, group, h_ii.shape[0])
  h = jnp.asarray(h_ii, jnp.float32)
  errs = sum(np.asarray(scale_errors(jnp.asarray(w, jnp.float32), h, mean_abs_i, fmt, group,
                                     tuple(alphas)), np.float64) for w in ws_oi)
  best = alphas[int(np.argmin(errs))]
  return np.asarray(channel_scales(mean_abs_i, best), np.float64), errs


def search_clip(w_oi: np.ndarray, h_ii: np.ndarray, fmt: Q.QuantFormat, group: int,
                ratios=None) -> tuple[gptq.Grid, tuple, np.ndarray]:
  """Per (row, group) the range ratio of least `clip_errors` (over `clip_ratios(fmt)` unless
  given).

  Returns:
    (grid, stored (scale, zero point), chosen ratios `(out, groups)`).
  """
  _check(fmt, group, w_oi.shape[1])
  ratios = clip_ratios(fmt) if ratios is None else ratios
  errs = np.asarray(clip_errors(jnp.asarray(w_oi, jnp.float32), jnp.asarray(h_ii, jnp.float32),
                                fmt, group, tuple(ratios)))
  best_r = np.asarray(ratios, np.float32)[np.argmin(errs, axis=0)]  # first (largest) on ties
  grid, stored = clipped_grid(w_oi, fmt, group, best_r)
  return grid, stored, best_r


def _check(fmt: Q.QuantFormat, group: int, inp: int) -> None:
  if fmt not in AWQ_FORMATS:
    raise ValueError(f"AWQ supports {', '.join(f.value for f in AWQ_FORMATS)}, not {fmt.value}")
  if inp % group:
    raise ValueError(f"group {group} does not divide {inp} inputs")


# ---------------------------------------------------------------------------- folding


def fold_layer(mats: dict[str, np.ndarray], norms: dict[str, np.ndarray],
               scales: dict[str, np.ndarray], plus_one: bool = False) -> tuple[dict, dict]:
  """Applies per-channel `scales` (tap -> `(in,)`) to one layer; exact in float.

  Args:
    mats: linear name -> HF `[out, in]` matrix.
    norms: 'attn_norm' / 'mlp_norm' -> RMSNorm weight, and 'v_bias' -> v's bias (HF `(out,)`)
      when the model has one.
    scales: keys of `SCALE_GROUPS`.
    plus_one: the norms scale by (1 + w) (Gemma).

  Returns:
    (mats, norms) with the readers' input columns multiplied by `s` and the producer (norm
    weight, or output rows and their bias) divided by it.
  """
  mats, norms = dict(mats), dict(norms)
  for tap, s in scales.items():
    readers, (producer, kind) = SCALE_GROUPS[tap]
    for n in readers:
      mats[n] = mats[n] * s[None, :]
    if kind == "norm":
      norms[producer] = (1.0 + norms[producer]) / s - 1.0 if plus_one else norms[producer] / s
    else:
      mats[producer] = mats[producer] / s[:, None]
      if f"{producer}_bias" in norms:
        norms[f"{producer}_bias"] = norms[f"{producer}_bias"] / s
  return mats, norms


def folded_vectors(cfg) -> tuple[str, ...]:
  """The per-layer vectors AWQ's folding rewrites: the two norms, and v's bias if any."""
  return ("attn_norm", "mlp_norm", *(("v_bias",) if cfg.attention_bias else ()))


def fold_params(params: dict, cfg, scales: dict[str, np.ndarray]) -> dict:
  """`fold_layer` on every layer of a float param tree.

  Args:
    params: float params.
    cfg: their `LlamaConfig`.
    scales: tap -> `(layers, in)` per-channel scales; 'attn_heads' only without GQA.

  Returns:
    Float params computing the same function (up to rounding).
  """
  from minitron_jax import axes

  if "attn_heads" in scales and cfg.num_attention_heads != cfg.num_key_value_heads:
    raise ValueError("attn_heads scales need one KV head per query head (no GQA)")
  specs = {s.path[-1]: s for s in axes.param_specs(cfg) if s.stacked}
  names = [n for n in specs if len(specs[n].hf_axes) == 2]
  layers = dict(params["layers"])
  mats = {n: np.asarray(Q.to_matrix(layers[n], specs[n]), np.float64) for n in names}
  norms = {n: np.asarray(layers[n], np.float64).reshape(cfg.num_hidden_layers, -1)
           for n in folded_vectors(cfg)}
  for i in range(cfg.num_hidden_layers):
    m, nm = fold_layer({n: mats[n][i] for n in names}, {n: v[i] for n, v in norms.items()},
                       {t: np.asarray(s[i], np.float64) for t, s in scales.items()},
                       plus_one=cfg.norm_plus_one)
    for n in names:
      mats[n][i] = m[n]
    for n in norms:
      norms[n][i] = nm[n]
  for n in names:
    out_dims, in_dims, perm = Q.matrix_layout(specs[n], layers[n].shape)
    m = mats[n].reshape(-1, *out_dims, *in_dims).transpose(0, *(1 + p for p in perm))
    layers[n] = jnp.asarray(m, layers[n].dtype)
  for n, v in norms.items():
    layers[n] = jnp.asarray(v.reshape(layers[n].shape), layers[n].dtype)
  return dict(params, layers=layers)
