"""Sparsity of a whole model: every decoder-layer linear weight, layer by layer.

Magnitude pruning needs no data. Wanda and SparseGPT carry the calibration batches' hidden
states through the model one decoder layer at a time, as GPTQ does (`quantize.calibrate`):
layer `l`'s input Hessians `X Xᵀ` come from the outputs of layers `0..l-1` *already pruned*,
so each layer compensates the error that reaches it; layer `l` is then pruned and run once
more to give layer `l + 1` its inputs. The embedding, LM head and norms stay dense.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax import axes
from minitron_jax import model as M
from minitron_jax.config import LlamaConfig
from minitron_jax.progress import Progress
from minitron_jax.quantize import calibrate
from minitron_jax.quantize import formats as Q
from minitron_jax.sparsify import methods
from minitron_jax.sparsify.methods import Pattern

SPARSE_LEAVES = tuple(n for n in Q.INPUT_TAPS)  # q, k, v, o, gate, up, down


def sparse_specs(cfg: LlamaConfig) -> dict[str, axes.ParamSpec]:
  """name -> spec of every matrix that is sparsified (the stacked linear weights)."""
  return {s.path[-1]: s for s in axes.param_specs(cfg)
          if s.stacked and s.path[-1] in SPARSE_LEAVES}


def check_model(cfg: LlamaConfig, pattern: Pattern) -> None:
  """Raises ValueError, before any weight is read, if a matrix cannot take `pattern`."""
  for name, spec in sparse_specs(cfg).items():
    pattern.check_inputs(spec.hf_name.replace("{i}", "*"), axes.hf_shape(spec, cfg)[1])


def matrix_to_leaf(m_oi: np.ndarray, spec: axes.ParamSpec, leaf_shape: tuple[int, ...]
                   ) -> np.ndarray:
  """One layer's `[out, in]` matrix -> our leaf layout (`leaf_shape` without `layers`)."""
  out_dims, in_dims, perm = Q.matrix_layout(spec, (1, *leaf_shape))
  return np.asarray(m_oi).reshape(*out_dims, *in_dims).transpose(perm)


def layer_matrices(params: dict, cfg: LlamaConfig) -> dict[str, np.ndarray]:
  """name -> `(layers, out, in)` numpy matrices of the sparsified weights."""
  return {n: np.asarray(Q.to_matrix(params["layers"][n], s))
          for n, s in sparse_specs(cfg).items()}


def sparsify_params(params: dict, cfg: LlamaConfig, method: str, pattern: Pattern,
                    batches: Iterable[np.ndarray] | None = None, *, block_size: int = 128,
                    damp: float = 0.01, progress: bool = False) -> dict:
  """`params` with every decoder-layer linear weight pruned by `method` to `pattern`.

  Args:
    params: float param tree.
    cfg: its config.
    method: one of `methods.METHODS`.
    pattern: N:M or unstructured.
    batches: calibration token arrays `(B, T)` (Wanda, SparseGPT).
    block_size, damp: see `methods.sparsegpt`.
    progress: print a progress line per layer.

  Returns:
    The param tree, same dtypes, with the pruned weights exactly zero.
  """
  if method not in methods.METHODS:
    raise ValueError(f"unknown sparsity method {method!r}; known: {', '.join(methods.METHODS)}")
  check_model(cfg, pattern)
  specs = sparse_specs(cfg)
  mats = layer_matrices(params, cfg)
  xs = []
  if method in methods.CALIBRATED:
    xs = [M.embed(params, cfg, jnp.asarray(b, jnp.int32)) for b in (batches or [])]
    if not xs:
      raise ValueError(f"{method} needs at least one calibration batch")
  dense_layer, run_layer = calibrate.layer_fn(cfg, True), calibrate.layer_fn(cfg, False)
  sliding_l = M.sliding_flags(cfg)  # each layer runs with its own attention kind and RoPE
  layers = dict(params["layers"])
  pruned = {n: [] for n in specs}
  bar = Progress(f"{method} {pattern.name}", cfg.num_hidden_layers, "layers", enabled=progress)
  for i in range(cfg.num_hidden_layers):
    lp = jax.tree_util.tree_map(lambda a: a[i], params["layers"])
    hess = _hessians(dense_layer, lp, xs, sliding_l[i]) if xs else {}
    for n in specs:
      h = hess.get(Q.INPUT_TAPS[n])
      w = methods.prune_matrix(mats[n][i], h, method, pattern, block_size=block_size,
                               damp=damp)
      pruned[n].append(matrix_to_leaf(w, specs[n], lp[n].shape).astype(lp[n].dtype))
      lp[n] = jnp.asarray(pruned[n][-1])
    if xs:
      xs = [run_layer(lp, x, sliding_l[i])[0] for x in xs]
    bar.update(i + 1)
  for n in specs:
    layers[n] = jnp.asarray(np.stack(pruned[n]))
  return {**params, "layers": layers}


def _hessians(dense_layer, lp: dict, xs: list[jax.Array], sliding) -> dict[str, np.ndarray]:
  """tap -> `X Xᵀ` (float64) summed over every calibration batch of one layer."""
  total = None
  for x in xs:
    got = {k: v[0] for k, v in dense_layer(lp, x, sliding)[1].items()}
    total = got if total is None else jax.tree_util.tree_map(jnp.add, total, got)
  return {k: np.asarray(v, np.float64) for k, v in total.items()}


def sparsity_stats(params: dict, cfg: LlamaConfig, pattern: Pattern) -> dict:
  """Zero fraction of the sparsified weights, overall and per matrix name, and whether every
  group satisfies an N:M `pattern` (ValueError naming the tensor if not)."""
  zeros = total = 0
  per = {}
  for n, m in layer_matrices(params, cfg).items():
    for i, w in enumerate(m):
      try:
        methods.check_pattern(w, pattern)
      except ValueError as e:
        raise ValueError(f"layer {i} {n}: {e}") from None
    z = int(m.size - np.count_nonzero(m))
    per[n] = z / m.size
    zeros, total = zeros + z, total + m.size
  return {"sparsity": zeros / total, "per_matrix": per, "pattern": pattern.name}
