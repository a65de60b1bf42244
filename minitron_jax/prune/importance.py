"""Importance of every prunable unit: attention heads, MLP neurons, embedding channels, layers.

Activation importance (Minitron) needs forward passes only: per calibration batch a jitted
forward reduces each tapped activation over the sequence inside the layer scan, and the
per-sample results are aggregated over the batch on the host in float64:

- head n of layer l: ||attention output of head n||_2 per token (the input of o_proj);
- MLP neuron f: act(gate_f) * up_f per token (the input of down_proj);
- embedding channel d: the outputs of every RMSNorm that feeds a projection (both norms of
  every layer and the final norm), each aggregated, then summed.

Aggregation per axis is one of `mean` (mean of |x|), `l2` (sqrt of the sum of squares) or `var`
(variance); the sequence axis is reduced first. Minitron's best: L2 over batch, mean over
sequence. Alternatives (`taylor`, `magnitude`, `random`) score the same groups from weights.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax import axes
from minitron_jax import model as M
from minitron_jax.config import LlamaConfig

AGGREGATIONS = ("mean", "l2", "var")
METHODS = ("activation", "taylor", "magnitude", "random")


@dataclasses.dataclass(frozen=True)
class Aggregation:
  batch: str = "l2"
  seq: str = "mean"

  def __post_init__(self):
    for name, v in (("batch", self.batch), ("seq", self.seq)):
      if v not in AGGREGATIONS:
        raise ValueError(f"aggregation over {name}: {v!r} is not one of {AGGREGATIONS}")

  @classmethod
  def parse(cls, spec: str) -> "Aggregation":
    """`"l2,mean"` = L2 over batch, mean over sequence."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 2:
      raise ValueError(f"--aggregation {spec!r}: expected 'batch_agg,seq_agg', e.g. 'l2,mean'")
    return cls(batch=parts[0], seq=parts[1])


@dataclasses.dataclass
class Scores:
  """Importance per prunable unit (higher = more important)."""

  heads: np.ndarray      # (L, N)
  neurons: np.ndarray    # (L, F)
  channels: np.ndarray   # (D,)
  kv_groups: np.ndarray  # (L, K)

  def to_npz_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
    return {f"{prefix}{k}": v for k, v in dataclasses.asdict(self).items()}


def reduce_seq(x: jax.Array, how: str) -> jax.Array:
  """Reduces axis 1 (sequence) of (B, T, ...) in float32."""
  x = x.astype(jnp.float32)
  if how == "mean":
    return jnp.mean(jnp.abs(x), axis=1)
  if how == "l2":
    return jnp.sqrt(jnp.sum(x * x, axis=1))
  return jnp.var(x, axis=1)


class BatchAggregator:
  """Streams per-sample values (B, ...) and aggregates them over all samples (float64)."""

  def __init__(self):
    self.n = 0
    self.sum = self.sum_abs = self.sum_sq = None

  def add(self, x_b: np.ndarray) -> None:
    x = np.asarray(x_b, np.float64)
    parts = (x.sum(0), np.abs(x).sum(0), (x * x).sum(0))
    if self.sum is None:
      self.sum, self.sum_abs, self.sum_sq = parts
    else:
      self.sum, self.sum_abs, self.sum_sq = (a + b for a, b in
                                             zip((self.sum, self.sum_abs, self.sum_sq), parts))
    self.n += x.shape[0]

  def result(self, how: str) -> np.ndarray:
    if self.n == 0:
      raise ValueError("no calibration samples")
    if how == "mean":
      return self.sum_abs / self.n
    if how == "l2":
      return np.sqrt(self.sum_sq)
    mean = self.sum / self.n
    return np.maximum(self.sum_sq / self.n - mean * mean, 0.0)


@functools.lru_cache(maxsize=None)
def _activation_step(cfg: LlamaConfig, seq: str):
  def head_norms(x_btnh):
    return reduce_seq(jnp.linalg.norm(x_btnh.astype(jnp.float32), axis=-1), seq)

  taps = {"attn_heads": head_norms, "mlp_act": lambda x: reduce_seq(x, seq),
          "attn_in": lambda x: reduce_seq(x, seq), "mlp_in": lambda x: reduce_seq(x, seq),
          "final_norm": lambda x: reduce_seq(x, seq)}

  def step(params, tokens_bt):
    out = M.forward(params, cfg, tokens_bt, taps=taps)
    t = out["taps"]
    # Layers first -> batch first, so the host aggregates over axis 0.
    return {k: jnp.moveaxis(v, 1, 0) if k != "final_norm" else v for k, v in t.items()}

  return jax.jit(step)


def activation_scores(params, cfg: LlamaConfig, batches: Iterable[np.ndarray],
                      aggregation: Aggregation = Aggregation(), progress=None) -> Scores:
  """Forward-only importance over calibration batches of token ids (B, T)."""
  step = _activation_step(cfg, aggregation.seq)
  aggs: dict[str, BatchAggregator] = {}
  n = 0
  for tokens in batches:
    out = step(params, np.asarray(tokens, np.int32))
    for k, v in out.items():
      aggs.setdefault(k, BatchAggregator()).add(np.asarray(v))
    n += len(tokens)
    if progress:
      progress(n)
  r = {k: a.result(aggregation.batch) for k, a in aggs.items()}
  channels = r["attn_in"].sum(0) + r["mlp_in"].sum(0) + r["final_norm"]
  heads = r["attn_heads"]
  return Scores(heads=heads, neurons=r["mlp_act"], channels=channels,
                kv_groups=_group_sum(heads, cfg))


def _group_sum(heads_ln: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
  """Query-head scores summed per KV group (head n belongs to group n // G)."""
  l, n = heads_ln.shape
  return heads_ln.reshape(l, cfg.num_key_value_heads, n // cfg.num_key_value_heads).sum(-1)


def group_reduce(tree, cfg: LlamaConfig, axis: str, fn=np.abs) -> np.ndarray:
  """Sums `fn(leaf)` over every axis but `layers` and `axis`, over every leaf that has `axis`.

  Returns (L, n) for per-layer axes, (n,) for `embed` (summed over layers too).
  """
  total = None
  for spec in axes.param_specs(cfg):
    if axis not in spec.axes:
      continue
    x = np.asarray(jax.device_get(axes.get(tree, spec)), np.float64)
    keep = [i for i, a in enumerate(spec.axes) if a == axis or (a == axes.LAYERS and
                                                                  axis != axes.EMBED)]
    s = fn(x).sum(axis=tuple(i for i in range(x.ndim) if i not in keep))
    total = s if total is None else total + s
  return total


def _scores_from_groups(per_axis: dict[str, np.ndarray], cfg: LlamaConfig) -> Scores:
  heads = per_axis[axes.Q_HEADS]
  return Scores(heads=heads, neurons=per_axis[axes.MLP], channels=per_axis[axes.EMBED],
                kv_groups=per_axis[axes.KV_HEADS] + _group_sum(heads, cfg))


def magnitude_scores(params, cfg: LlamaConfig) -> Scores:
  """L2 norm of all weights in each group."""
  sq = {a: group_reduce(params, cfg, a, np.square) for a in
        (axes.Q_HEADS, axes.KV_HEADS, axes.MLP, axes.EMBED)}
  return _scores_from_groups({a: np.sqrt(v) for a, v in sq.items()}, cfg)


def lm_loss(params, cfg: LlamaConfig, tokens_bt, layer_mask=None):
  """Mean next-token cross-entropy of (B, T) token ids."""
  logits = M.forward(params, cfg, tokens_bt, layer_mask=layer_mask)["logits"]
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1))


def taylor_scores(params, cfg: LlamaConfig, batches: Iterable[np.ndarray],
                  progress=None) -> Scores:
  """First-order Taylor importance |w * dL/dw| summed per group (LLM-Pruner), gradients of
  the LM loss accumulated over the calibration batches."""
  grad_fn = jax.jit(jax.grad(lambda p, t: lm_loss(p, cfg, t)))
  total, n = None, 0
  for tokens in batches:
    g = grad_fn(params, np.asarray(tokens, np.int32))
    total = g if total is None else jax.tree_util.tree_map(jnp.add, total, g)
    n += len(tokens)
    if progress:
      progress(n)
  wg = jax.tree_util.tree_map(lambda w, g: jnp.abs(w.astype(jnp.float32) * g), params, total)
  return _scores_from_groups({a: group_reduce(wg, cfg, a) for a in
                              (axes.Q_HEADS, axes.KV_HEADS, axes.MLP, axes.EMBED)}, cfg)


def random_scores(cfg: LlamaConfig, seed: int = 0) -> Scores:
  """Uniform random scores: the baseline every real criterion must beat."""
  rng = np.random.default_rng(seed)
  l, n, k = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
  return Scores(heads=rng.random((l, n)), neurons=rng.random((l, cfg.intermediate_size)),
                channels=rng.random(cfg.hidden_size), kv_groups=rng.random((l, k)))


def compute_scores(method: str, params, cfg: LlamaConfig, batches=None,
                   aggregation: Aggregation = Aggregation(), seed: int = 0,
                   progress=None) -> Scores:
  if method not in METHODS:
    raise ValueError(f"--importance {method!r} is not one of {METHODS}")
  if method == "activation":
    return activation_scores(params, cfg, batches, aggregation, progress)
  if method == "taylor":
    return taylor_scores(params, cfg, batches, progress)
  if method == "magnitude":
    return magnitude_scores(params, cfg)
  return random_scores(cfg, seed)
