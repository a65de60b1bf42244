"""Calibrated quantization of a whole model, layer by layer (GPTQ, AWQ, AWQ then GPTQ).

The calibration batches' hidden states are carried through the model one decoder layer at a
time: layer `l`'s linear inputs are gathered (the model's own taps, reduced to Hessians
`X Xᵀ` inside the jitted layer) from the outputs of layers `0..l-1` *already quantized*, so
each layer's rounding compensates for the error that reaches it. Layer `l` is then quantized
and run once more, quantized, to give layer `l + 1` its inputs.

AWQ (`awq.py`) first folds its per-channel scales into the layer (the Hessians follow exactly:
`H' = diag(1/s) H diag(1/s)`), clips each weight's grid, and rounds to nearest (`awq`) or with
GPTQ (`awq_gptq`) on that grid.

The embedding and LM head, when quantized at all (`include_embeddings`), use round-to-nearest.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax import attention, axes
from minitron_jax import model as M
from minitron_jax.config import LlamaConfig
from minitron_jax.progress import Progress
from minitron_jax.quantize import awq
from minitron_jax.quantize import formats as Q
from minitron_jax.quantize import gptq
from minitron_jax.settings import SettingError

METHODS = ("rtn", "gptq", "awq", "awq_gptq")
CALIBRATED = ("gptq", "awq", "awq_gptq")


def applies(method: str, fmt: Q.QuantFormat) -> bool:
  """Whether `method` (one of `METHODS`) can quantize `fmt`."""
  if method == "gptq":
    return fmt in gptq.GPTQ_FORMATS
  if method.startswith("awq"):
    return fmt in awq.AWQ_FORMATS
  return True


def default_method(fmt: Q.QuantFormat, calibrated: bool) -> str:
  """The method used when none is named: with calibration data the best one measured for
  `fmt` (AWQ then GPTQ for the 4-bit formats, GPTQ for the rest), else round to nearest."""
  if not calibrated:
    return "rtn"
  return next((m for m in ("awq_gptq", "gptq") if applies(m, fmt)), "rtn")


def check_method(method: str, fmt: Q.QuantFormat) -> None:
  """Raises ValueError if `method` cannot quantize `fmt`."""
  if method not in METHODS:
    raise SettingError("method", f"{{name}}={method!r} is not a quantization method; known: "
                       f"{', '.join(METHODS)}")
  if method == "gptq" and fmt not in gptq.GPTQ_FORMATS:
    raise SettingError("method", f"{{name}}=gptq supports "
                       f"{', '.join(f.value for f in gptq.GPTQ_FORMATS)}, not {fmt.value}")
  if method.startswith("awq") and fmt not in awq.AWQ_FORMATS:
    raise SettingError("method", f"{{name}}={method} supports "
                       f"{', '.join(f.value for f in awq.AWQ_FORMATS)}, not {fmt.value}")


def _stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(`X Xᵀ`, per-channel sum of |x|) of an activation whose leading two axes are tokens
  (B, T, ...), float32."""
  x = x.reshape(x.shape[0] * x.shape[1], -1).astype(jnp.float32)
  return x.T @ x, jnp.sum(jnp.abs(x), axis=0)


@functools.lru_cache(maxsize=None)
def _layer_fn(cfg: LlamaConfig, with_hessians: bool):
  """Jitted (layer params, x_btd) -> (layer output, tap -> (Hessian, |x| sums) or {})."""
  taps = {t: _stats for t in sorted(set(Q.INPUT_TAPS.values()))} if with_hessians else {}

  def run(lp, x_btd, sliding):
    b, t = x_btd.shape[:2]
    positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    setup = M.layer_setup(cfg, positions_bt, x_btd.dtype, lambda window: functools.partial(
        attention.attend, segment_ids_bt=None, scale=cfg.attn_scale, impl=cfg.attention_impl,
        window=window))  # one causal sequence per row, as `M.forward`
    cos_bth, sin_bth, attend = setup(sliding)
    y_btd, _, tapped = M._block(cfg, lp, x_btd, cos_bth, sin_bth, attend, None, taps)
    return y_btd, tapped

  return jax.jit(run)


def layer_fn(cfg: LlamaConfig, with_hessians: bool):
  """Jitted `(layer params, x_btd, sliding) -> (layer output, tap -> (X Xᵀ, sum |x|) or {})` of
  one decoder layer (cached per config; `sliding`: that layer's entry of `M.sliding_flags`)."""
  return _layer_fn(cfg, with_hessians)


def _stack(parts: list[tuple]) -> tuple:
  """Per-layer (values, scale, zero point) -> stacked over a leading layers axis."""
  values, scale, zp = zip(*parts)
  return (jnp.asarray(np.stack(values)), jnp.asarray(np.stack(scale)),
          None if zp[0] is None else jnp.asarray(np.stack(zp)))


def _layer_stats(float_layer, lp: dict, xs: list[jax.Array], sliding) -> dict:
  """tap -> (Hessian, |x| sums), summed over every calibration batch of one float layer."""
  stats = None
  for x in xs:
    got = float_layer(lp, x, sliding)[1]
    stats = got if stats is None else jax.tree_util.tree_map(jnp.add, stats, got)
  return stats


def _awq_scales(w: dict, hess: dict, stats: dict, groups: dict, tokens: int,
                fmt: Q.QuantFormat, blocks: dict) -> dict[str, np.ndarray]:
  """tap -> AWQ's per-channel scales, searched jointly over the matrices that read it."""
  scales = {}
  for tap, (readers, _) in groups.items():
    mean_abs = np.asarray(stats[tap][1], np.float64) / tokens
    scales[tap], _ = awq.search_scales([w[n] for n in readers], hess[tap], mean_abs, fmt,
                                       blocks[readers[0]][1])
  return scales


@dataclasses.dataclass(frozen=True)
class _Rounding:
  """How each matrix is rounded: the method and the GPTQ settings (`gptq.gptq`)."""
  method: str
  fmt: Q.QuantFormat
  group_size: int
  damp: float
  act_order: bool
  block_size: int

  def round(self, w_oi: np.ndarray, h_ii: np.ndarray, block: tuple) -> tuple:
    """(values, scale, zero point) of one matrix, as `gptq.quantize_matrix` gives them."""
    if self.method == "gptq":
      return gptq.quantize_matrix(w_oi, h_ii, self.fmt, group_size=self.group_size,
                                  damp=self.damp, act_order=self.act_order,
                                  block_size=self.block_size)
    grid, (scale, zp), _ = awq.search_clip(w_oi, h_ii, self.fmt, block[1])
    codes = (awq.rtn_codes(w_oi, grid) if self.method == "awq" else
             gptq.gptq(w_oi, h_ii, grid, damp=self.damp, act_order=self.act_order,
                       block_size=self.block_size))
    return gptq.encode(codes, self.fmt), scale, zp


def _assembled(params: dict, cfg: LlamaConfig, parts: dict, fmt: Q.QuantFormat, blocks: dict,
               layouts: dict, act: dict, group_size: int, include_embeddings: bool) -> dict:
  """The quantized tree: calibrated layer matrices and norms stacked, the rest rounded."""
  items = []
  for spec, leaf in axes.iter_leaves(params, cfg):
    name = spec.path[-1]
    if spec.stacked and name in blocks:
      leaf = Q.QuantizedArray(*_stack(parts[name]), act[name], fmt.value, blocks[name],
                              *layouts[name])
    elif spec.stacked and name in awq.folded_vectors(cfg):
      leaf = jnp.asarray(np.stack(parts[name]))
    elif Q.is_quantizable(spec, include_embeddings):
      leaf = Q.quantize_leaf(leaf, spec, fmt, group_size)
    items.append((spec, leaf))
  return axes.tree_from_leaves(items)


def calibrated_params(params: dict, cfg: LlamaConfig, fmt: Q.QuantFormat | str,
                      batches: Iterable[np.ndarray], method: str = "gptq", *,
                      group_size: int = Q.DEFAULT_GROUP_SIZE, include_embeddings: bool = False,
                      damp: float = 0.01, act_order: bool = True, block_size: int = 128,
                      activation_scales: Mapping[str, jax.Array] | None = None,
                      progress: bool = False) -> dict:
  """`quantize_params` with calibrated rounding of every decoder-layer linear weight.

  Args:
    params: float param tree.
    cfg: its config.
    fmt: one of `gptq.GPTQ_FORMATS` ('gptq'), `awq.AWQ_FORMATS` ('awq', 'awq_gptq').
    batches: calibration token arrays `(B, T)`.
    method: 'gptq', 'awq' (AWQ scales and clipping, then round to nearest) or 'awq_gptq'
      (AWQ scales and clipping, then GPTQ on the clipped grid).
    group_size, include_embeddings: as in `formats.quantize_params`.
    damp, act_order, block_size: see `gptq.gptq`.
    activation_scales: static FP8 input scales per tap (`formats.calibrate_activation_scales`),
      attached as in `formats.quantize_params`; the layers after each quantized layer see its
      output with the activations rounded to FP8 by them, as the deployed model computes it.
    progress: print a progress line per layer.

  Returns:
    A quantized param tree of the same layout as `formats.quantize_params` gives; under AWQ
    the RMSNorm weights (and v / up rows, before quantization) carry the folded scales.
  """
  fmt = Q.parse_format(fmt)
  check_method(method, fmt)
  if activation_scales and fmt.kind != "fp8":
    raise ValueError("static activation scales are FP8 only")
  act = {n: (None if not activation_scales or t not in activation_scales else
             jnp.asarray(activation_scales[t], jnp.float32)) for n, t in Q.INPUT_TAPS.items()}
  if method not in CALIBRATED:
    raise ValueError(f"{method!r} is not a calibrated method ({', '.join(CALIBRATED)})")
  xs = [M.embed(params, cfg, jnp.asarray(b, jnp.int32)) for b in batches]
  if not xs:
    raise ValueError(f"{method} calibration needs at least one batch")
  specs = {s.path[-1]: s for s in axes.param_specs(cfg) if s.stacked and Q.is_quantizable(s)}
  mats = {n: Q.to_matrix(params["layers"][n], s) for n, s in specs.items()}
  layouts = {n: Q.matrix_layout(s, params["layers"][n].shape) for n, s in specs.items()}
  blocks = {n: Q.block_shape(fmt, *mats[n].shape[-2:], group_size) for n in specs}
  groups = awq.scale_groups(cfg.num_attention_heads, cfg.num_key_value_heads)
  rounding = _Rounding(method, fmt, group_size, damp, act_order, block_size)
  vectors = awq.folded_vectors(cfg)  # what AWQ's folding may rewrite
  parts: dict[str, list] = {n: [] for n in (*specs, *vectors)}
  sliding_l = M.sliding_flags(cfg)
  float_layer, quant_layer = _layer_fn(cfg, True), _layer_fn(cfg, False)
  tokens = sum(x.shape[0] * x.shape[1] for x in xs)
  bar = Progress(f"{method} {fmt.value}", cfg.num_hidden_layers, "layers", enabled=progress)
  for i in range(cfg.num_hidden_layers):
    lp = jax.tree_util.tree_map(lambda a: a[i], params["layers"])
    stats = _layer_stats(float_layer, lp, xs, sliding_l[i])
    hess = {k: np.asarray(v[0], np.float64) for k, v in stats.items()}
    w = {n: np.asarray(mats[n][i], np.float64) for n in specs}
    norms = {n: np.asarray(lp[n], np.float64).reshape(-1) for n in vectors}
    if method.startswith("awq"):
      scales = _awq_scales(w, hess, stats, groups, tokens, fmt, blocks)
      w, norms = awq.fold_layer(w, norms, scales, plus_one=cfg.norm_plus_one)
      for tap, s in scales.items():
        hess[tap] = hess[tap] / np.outer(s, s)
    qlp = dict(lp)
    for n in vectors:
      qlp[n] = jnp.asarray(norms[n].reshape(lp[n].shape), lp[n].dtype)
      parts[n].append(np.asarray(qlp[n]))
    for n in specs:
      part = rounding.round(w[n], hess[Q.INPUT_TAPS[n]], blocks[n])
      parts[n].append(part)
      values, scale, zp = (None if a is None else jnp.asarray(a) for a in part)
      qlp[n] = Q.QuantizedArray(values, scale, zp, None if act[n] is None else act[n][i],
                                fmt.value, blocks[n], *layouts[n])
    xs = [quant_layer(qlp, x, sliding_l[i])[0] for x in xs]
    bar.update(i + 1)
  return _assembled(params, cfg, parts, fmt, blocks, layouts, act, group_size,
                    include_embeddings)


def quantize_with_method(params: dict, cfg: LlamaConfig, fmt: Q.QuantFormat, method: str,
                         batches: Iterable[np.ndarray] | None = None, **kw) -> tuple[dict, float]:
  """(quantized params, seconds spent) by `method` ('rtn', or a calibrated one on `batches`)."""
  check_method(method, fmt)
  t0 = time.perf_counter()
  if method in CALIBRATED:
    if batches is None:
      raise SettingError("calib.data", f"method={method} needs calibration data: set {{name}}")
    out = calibrated_params(params, cfg, fmt, batches, method, **kw)
  else:
    kw = {k: v for k, v in kw.items() if k in ("group_size", "include_embeddings")}
    out = Q.quantize_params(params, cfg, fmt, **kw)
  jax.block_until_ready(out)
  return out, time.perf_counter() - t0
