"""Quantization-aware distillation (QAD): train the weights that will be quantized.

`fake_quant_transform(cfg, fmt)` maps float params to params whose linear weights hold
exactly the values the `fmt` export will store (quantize, then dequantize, with the same
round-to-nearest as `formats.quantize_params`), while the gradient passes straight through the
rounding to the float master weights (straight-through estimator:
`w + stop_gradient(q(w) - w)`). The distillation step applies it to the student inside the
loss (teacher = the float model), so the student learns weights whose quantized form matches
the teacher; exporting the trained float weights in `fmt` then gives that quantized model.

`FrozenGrid` starts QAD from a calibrated model instead (ModelOpt's recipe): the grid of every
quantized weight (its scales and zero points, e.g. from AWQ + GPTQ) stays fixed, the float
master weights start as the calibrated model's dequantized weights (so the first step sees
exactly the calibrated model), and training only moves weights between the points of that
grid; the export encodes the trained weights on it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from minitron_jax import axes
from minitron_jax.config import LlamaConfig
from minitron_jax.quantize import formats as Q
from minitron_jax.settings import SettingError


def check_format(fmt: Q.QuantFormat | str) -> Q.QuantFormat:
  """The format, if QAD can fake-quantize it inside a jitted step (not the GGUF formats,
  which quantize through llama.cpp's host code)."""
  fmt = Q.parse_format(fmt)
  if fmt.is_gguf:
    raise SettingError("qad.format", f"{{name}}: {fmt.value} is quantized on the host; use one "
                       f"of {', '.join(f.value for f in Q.QuantFormat if not f.is_gguf)}")
  return fmt


def fake_quantize(x: jax.Array, spec: axes.ParamSpec, fmt: Q.QuantFormat,
                  group_size: int = Q.DEFAULT_GROUP_SIZE) -> jax.Array:
  """`x` with the value of its quantized form and the gradient of the identity."""
  q = Q.quantize_leaf(x, spec, fmt, group_size).dequantize(jnp.float32).astype(x.dtype)
  return x + jax.lax.stop_gradient(q - x)


def fake_quant_transform(cfg: LlamaConfig, fmt: Q.QuantFormat | str,
                         group_size: int = Q.DEFAULT_GROUP_SIZE) -> Callable[[dict], dict]:
  """params -> params with every linear weight (not the embedding, norms or LM head)
  fake-quantized in `fmt`; pure and jittable."""
  fmt = check_format(fmt)
  Q.check_dims(cfg, fmt, group_size)

  def apply(params: dict) -> dict:
    return axes.tree_from_leaves(
        (spec, fake_quantize(leaf, spec, fmt, group_size) if Q.is_quantizable(spec) else leaf)
        for spec, leaf in axes.iter_leaves(params, cfg))

  return apply


def fake_quantize_on(x: jax.Array, spec: axes.ParamSpec, q: Q.QuantizedArray) -> jax.Array:
  """`x` with the value of its encoding on the grid of `q`, the gradient of the identity."""
  deq = Q.requantize_leaf(x, spec, q).dequantize(jnp.float32).astype(x.dtype)
  return x + jax.lax.stop_gradient(deq - x)


@dataclasses.dataclass(frozen=True)
class FrozenGrid:
  """The grids of a quantized param tree (`formats.quantize_params` or a calibrated method)."""

  quantized: dict
  cfg: LlamaConfig

  def __post_init__(self):
    fmts = {leaf.fmt for _, leaf in self._grids()}
    if not fmts:
      raise ValueError("the param tree has no quantized leaf to take grids from")
    check_format(fmts.pop())

  def _grids(self):
    return [(s, x) for s, x in axes.iter_leaves(self.quantized, self.cfg) if Q.is_quantized(x)]

  def start_params(self, dtype=jnp.float32) -> dict:
    """Float master params: every quantized leaf dequantized (on its grid), the rest as is."""
    return axes.tree_from_leaves(
        (s, x.dequantize(dtype) if Q.is_quantized(x) else x)
        for s, x in axes.iter_leaves(self.quantized, self.cfg))

  def transform(self) -> Callable[[dict], dict]:
    """params -> params with every gridded weight fake-quantized on its frozen grid."""
    grids = {s.name: q for s, q in self._grids()}

    def apply(params: dict) -> dict:
      return axes.tree_from_leaves(
          (s, fake_quantize_on(x, s, grids[s.name]) if s.name in grids else x)
          for s, x in axes.iter_leaves(params, self.cfg))

    return apply

  def encode(self, params: dict) -> dict:
    """The quantized tree of float `params` on the frozen grids (for export)."""
    grids = {s.name: q for s, q in self._grids()}
    return axes.tree_from_leaves(
        (s, Q.requantize_leaf(x, s, grids[s.name]) if s.name in grids else x)
        for s, x in axes.iter_leaves(params, self.cfg))


class QadSetup:
  """The quantization side of a distillation job's `qad` spec (`distill.job.QadSpec`): the
  student's start and fake-quantization transform, and the quantized export afterwards.

  Checks the spec's format and method on construction, before any model is loaded, raising
  `SettingError` naming `qad.format` / `qad.method`.
  """

  def __init__(self, spec: Any, data: str):
    """`spec`: a `QadSpec` (format, group_size, method, calib); `data`: the job's training data
    (the calibration source when `spec.calib.data` is empty)."""
    from minitron_jax.quantize import calibrate
    from minitron_jax.quantize import export as quant_export

    try:
      self.fmt = check_format(quant_export.export_format(spec.format))
    except SettingError:
      raise
    except ValueError as e:
      raise SettingError("qad.format", f"{{name}}: {e}") from None
    if not calibrate.applies(spec.method, self.fmt):
      raise SettingError("qad.method", f"{{name}}={spec.method} cannot quantize "
                         f"{self.fmt.value}")
    self.spec = spec
    self.calib = dataclasses.replace(spec.calib, data=spec.calib.data or data)
    self.grid: FrozenGrid | None = None

  def __call__(self, params: dict, cfg: LlamaConfig, tok) -> tuple[dict, Callable[[dict], dict]]:
    """(params to start from, transform inside the loss) of the student `params`."""
    from minitron_jax.quantize import calibrate
    from minitron_jax.quantize import export as quant_export

    quant_export.check_consumers(cfg, self.fmt)
    if self.spec.method == "rtn":
      return params, fake_quant_transform(cfg, self.fmt, self.spec.group_size)
    from minitron_jax.data import corpus

    windows = self.calib.windows(corpus.load_tokens(self.calib.data, tok))
    print(f"calibrating the {self.spec.format} grid by {self.spec.method} on "
          f"{self.calib.data}", flush=True)
    quantized = calibrate.calibrated_params(params, cfg, self.fmt, self.calib.batches(windows),
                                            self.spec.method, group_size=self.spec.group_size,
                                            progress=True)
    self.grid = FrozenGrid(quantized, cfg)
    return self.grid.start_params(), self.grid.transform()

  def export(self, hf_dir: str, output_dir: str) -> dict:
    """Quantizes the trained float export `hf_dir` into `output_dir/quantized` (on the frozen
    grid of a calibrated method); returns the quantize report."""
    from minitron_jax.quantize import run as quantize_run

    return quantize_run.quantize_checkpoint(
        hf_dir, os.path.join(output_dir, "quantized"), self.spec.format, overwrite=True,
        group_size=self.spec.group_size, method="rtn", progress=False, frozen_grid=self.grid)
