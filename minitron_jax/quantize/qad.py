"""Quantization-aware distillation (QAD): train the weights that will be quantized.

`fake_quant_transform(cfg, fmt)` maps float params to params whose linear weights hold
exactly the values the `fmt` export will store (quantize, then dequantize, with the same
round-to-nearest as `formats.quantize_params`), while the gradient passes straight through the
rounding to the float master weights (straight-through estimator:
`w + stop_gradient(q(w) - w)`). The distillation step applies it to the student inside the
loss (teacher = the float model), so the student learns weights whose quantized form matches
the teacher; exporting the trained float weights in `fmt` then gives that quantized model.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from minitron_jax import axes
from minitron_jax.config import LlamaConfig
from minitron_jax.quantize import formats as Q


def check_format(fmt: Q.QuantFormat | str) -> Q.QuantFormat:
  """The format, if QAD can fake-quantize it inside a jitted step (not the GGUF formats,
  which quantize through llama.cpp's host code)."""
  fmt = Q.parse_format(fmt)
  if fmt.is_gguf:
    raise ValueError(f"--qad_format: {fmt.value} is quantized on the host; use one of "
                     f"{', '.join(f.value for f in Q.QuantFormat if not f.is_gguf)}")
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
