"""Importance of every prunable unit: attention heads, MLP neurons, embedding channels, layers.

Activation importance (Minitron) needs forward passes only: per calibration batch a jitted
forward reduces each tapped activation over the sequence inside the layer scan and folds the
per-sample results into float32 batch statistics kept on device (donated, updated in place);
the host fetches them once, after the last batch:

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

from jax.sharding import Mesh

from minitron_jax import axes, sharding
from minitron_jax import model as M
from minitron_jax.config import LlamaConfig
from minitron_jax.settings import SettingError

AGGREGATIONS = ("mean", "l2", "var")
METHODS = ("activation", "taylor", "magnitude", "random")


@dataclasses.dataclass(frozen=True)
class Aggregation:
  batch: str = "l2"
  seq: str = "mean"

  def __post_init__(self):
    for name, v in (("batch", self.batch), ("seq", self.seq)):
      if v not in AGGREGATIONS:
        raise SettingError("aggregation", f"{{name}} over {name}: {v!r} is not one of "
                           f"{AGGREGATIONS}")

  @classmethod
  def parse(cls, spec: str) -> "Aggregation":
    """`"l2,mean"` = L2 over batch, mean over sequence."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 2:
      raise SettingError("aggregation", f"{{name}}={spec!r}: expected 'batch_agg,seq_agg', "
                         "e.g. 'l2,mean'")
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


def batch_stats(x_b: jax.Array, how: str, weights_b: jax.Array | None = None
                ) -> dict[str, jax.Array]:
  """float32 statistics of per-sample values (B, ...) over the batch axis, enough to finish
  aggregation `how` after `merge_stats` has combined every batch. Rows of weight 0 (padding
  that lets a batch split evenly over devices) count for nothing."""
  x = x_b.astype(jnp.float32)
  if weights_b is None:
    if how == "mean":
      return {"sum": jnp.sum(jnp.abs(x), axis=0)}
    if how == "l2":
      return {"sum": jnp.sum(x * x, axis=0)}
    mean = jnp.mean(x, axis=0)  # var: count, mean and centred sum of squares (stable merge)
    return {"n": jnp.float32(x.shape[0]), "mean": mean, "m2": jnp.sum((x - mean) ** 2, axis=0)}
  w = weights_b.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  if how == "mean":
    return {"sum": jnp.sum(w * jnp.abs(x), axis=0)}
  if how == "l2":
    return {"sum": jnp.sum(w * x * x, axis=0)}
  n = jnp.sum(weights_b.astype(jnp.float32))
  mean = jnp.sum(w * x, axis=0) / jnp.maximum(n, 1.0)
  return {"n": n, "mean": mean, "m2": jnp.sum(w * (x - mean) ** 2, axis=0)}


def merge_stats(a: dict, b: dict) -> dict:
  """Combines two `batch_stats` (Chan et al.'s pairwise update for the variance)."""
  if "m2" not in a:
    return {"sum": a["sum"] + b["sum"]}
  n = a["n"] + b["n"]
  delta = b["mean"] - a["mean"]
  frac = b["n"] / jnp.maximum(n, 1.0)
  return {"n": n, "mean": a["mean"] + delta * frac,
          "m2": a["m2"] + b["m2"] + delta * delta * a["n"] * frac}


def finish_stats(stats: dict, n: int, how: str) -> np.ndarray:
  """The aggregate over all `n` samples, from merged statistics fetched to the host."""
  if n == 0:
    raise ValueError("no calibration samples")
  if how == "mean":
    return np.asarray(stats["sum"], np.float64) / n
  if how == "l2":
    return np.sqrt(np.asarray(stats["sum"], np.float64))
  return np.maximum(np.asarray(stats["m2"], np.float64) / n, 0.0)


def padded_batch(tokens, mesh: Mesh | None):
  """(tokens, weights) on `mesh`: rows padded with zeros (weight 0) to split evenly over the
  batch shards, then sharded; (tokens, None) without a mesh."""
  tokens = np.asarray(tokens, np.int32)
  if mesh is None:
    return tokens, None
  b = sharding.padded_rows(len(tokens), mesh)
  weights = np.zeros(b, np.float32)
  weights[:len(tokens)] = 1.0
  tokens = np.concatenate([tokens, np.zeros((b - len(tokens),) + tokens.shape[1:], np.int32)])
  return sharding.shard_rows(tokens, mesh), sharding.shard_rows(weights, mesh)


@functools.lru_cache(maxsize=None)
def activation_step(cfg: LlamaConfig, seq: str, batch: str, mesh: Mesh | None = None):
  """Jitted (params, tokens, weights, stats) -> stats, stats donated; one per (config,
  aggregation, mesh), so repeated calls reuse the compiled forward."""

  def head_norms(x_btnh):
    return reduce_seq(jnp.linalg.norm(x_btnh.astype(jnp.float32), axis=-1), seq)

  taps = {"attn_heads": head_norms, "mlp_act": lambda x: reduce_seq(x, seq),
          **{name: lambda x: reduce_seq(x, seq) for name in _channel_taps(cfg)}}

  def stats(params, tokens_bt, weights_b):
    t = M.forward(params, cfg, tokens_bt, taps=taps, logits=False)["taps"]
    # Layers first -> batch first, so statistics run over axis 0.
    return {k: batch_stats(jnp.moveaxis(v, 1, 0) if k != "final_norm" else v, batch, weights_b)
            for k, v in t.items()}

  def step(params, tokens_bt, weights_b, acc):
    return {k: merge_stats(acc[k], v) for k, v in stats(params, tokens_bt, weights_b).items()}

  def init(params, tokens_bt, weights_b):
    shapes = jax.eval_shape(stats, params, tokens_bt, weights_b)
    rep = None if mesh is None else sharding.replicated(mesh)
    return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype, device=rep), shapes)

  return sharding.jit_on(step, mesh, donate_argnums=(3,)), init


def activation_scores(params, cfg: LlamaConfig, batches: Iterable[np.ndarray],
                      aggregation: Aggregation = Aggregation(), progress=None,
                      mesh: Mesh | None = None) -> Scores:
  """Forward-only importance over calibration batches of token ids (B, T).

  With a `mesh`, params are sharded by the logical-axis rules and each batch's rows split
  over the batch axes (every host passes the same batches and feeds only its own rows); the
  statistics come back replicated.
  """
  if mesh is not None:
    params = sharding.shard_params(params, cfg, mesh)
  step, init = activation_step(cfg, aggregation.seq, aggregation.batch, mesh)
  acc, n = None, 0
  for tokens in batches:
    x, w = padded_batch(tokens, mesh)
    if acc is None:
      acc = init(params, x, w)
    acc = step(params, x, w, acc)
    n += len(tokens)
    if progress:
      progress(n)
  if acc is None:
    raise ValueError("no calibration samples")
  acc = jax.device_get(acc)  # the one transfer to the host
  r = {k: finish_stats(v, n, aggregation.batch) for k, v in acc.items()}
  channels = sum(r[name].sum(0) if name != "final_norm" else r[name]
                 for name in _channel_taps(cfg))
  heads = r["attn_heads"]
  return Scores(heads=heads, neurons=r["mlp_act"], channels=channels,
                kv_groups=_group_sum(heads, cfg))


def _channel_taps(cfg: LlamaConfig) -> tuple[str, ...]:
  """The normed activations whose per-channel magnitudes score hidden channels: every norm's
  output (Gemma's sandwich norms write theirs into the residual stream)."""
  sandwich = ("attn_out", "mlp_out") if cfg.sandwich_norms else ()
  return ("attn_in", "mlp_in", *sandwich, "final_norm")


def _group_sum(heads_ln: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
  """Query-head scores summed per KV group (head n belongs to group n // G)."""
  l, n = heads_ln.shape
  return heads_ln.reshape(l, cfg.num_key_value_heads, n // cfg.num_key_value_heads).sum(-1)


def _host64(x):
  return np.asarray(jax.device_get(x), np.float64)


def group_reduce(tree, cfg: LlamaConfig, axis: str, fn=np.abs, load=_host64) -> np.ndarray:
  """Sums `fn(leaf)` over every axis but `layers` and `axis`, over every leaf that has `axis`.

  `load` brings a leaf where the sum runs: float64 on the host by default; inside `jax.jit`
  pass `jnp.asarray` (and a jnp `fn`) to reduce sharded leaves on their devices.

  Returns (L, n) for per-layer axes, (n,) for `embed` (summed over layers too).
  """
  total = None
  for spec in axes.param_specs(cfg):
    if axis not in spec.axes:
      continue
    x = load(axes.get(tree, spec))
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


def lm_loss(params, cfg: LlamaConfig, tokens_bt, layer_mask=None, weights_b=None):
  """Mean next-token cross-entropy of (B, T) token ids (over the rows of weight 1 when
  `weights_b` marks padding rows with 0)."""
  logits = M.forward(params, cfg, tokens_bt, layer_mask=layer_mask)["logits"]
  nll_bt = M.token_nll_bt(logits[:, :-1], tokens_bt[:, 1:])
  if weights_b is None:
    return jnp.mean(nll_bt)
  return jnp.sum(nll_bt * weights_b[:, None]) / (jnp.sum(weights_b) * nll_bt.shape[1])


@functools.lru_cache(maxsize=None)
def jitted_lm_loss(cfg: LlamaConfig, masked: bool = False, mesh: Mesh | None = None):
  """`lm_loss` jitted once per config: (params, tokens) -> loss, or (params, tokens,
  layer_mask) -> loss when `masked`. On a `mesh` it takes sharded params, and tokens and
  row weights from `padded_batch` (one more argument, last)."""
  if mesh is not None:
    if masked:
      return sharding.MeshJit(lambda p, t, m, w: lm_loss(p, cfg, t, layer_mask=m, weights_b=w),
                              mesh)
    return sharding.MeshJit(lambda p, t, w: lm_loss(p, cfg, t, weights_b=w), mesh)
  if masked:
    return jax.jit(lambda p, t, m: lm_loss(p, cfg, t, layer_mask=m))
  return jax.jit(lambda p, t: lm_loss(p, cfg, t))


@functools.lru_cache(maxsize=None)
def _taylor_step(cfg: LlamaConfig, mesh: Mesh | None = None):
  """Jitted (params, tokens, weights, grad_sum) -> grad_sum + dL/dparams (float32, sum
  donated). Sharded inputs give a gradient sum sharded like the params."""
  grad = jax.grad(lambda p, t, w: lm_loss(p, cfg, t, weights_b=w))

  def step(params, tokens_bt, weights_b, total):
    return jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32), total,
                                  grad(params, tokens_bt, weights_b))

  if mesh is None:
    return jax.jit(step, donate_argnums=(3,))
  return sharding.MeshJit(step, mesh, replicate=False, donate_argnums=(3,))


# Module-level jit: compiled once per param structure and shapes, reused across calls.
_abs_weight_times_grad = jax.jit(lambda p, g: jax.tree_util.tree_map(
    lambda w, x: jnp.abs(w.astype(jnp.float32) * x), p, g))


_GROUP_AXES = (axes.Q_HEADS, axes.KV_HEADS, axes.MLP, axes.EMBED)


@functools.lru_cache(maxsize=None)
def _taylor_groups(cfg: LlamaConfig, mesh: Mesh):
  """Jitted (params, grad_sum) -> per-group sums of |w * g|, reduced where the sharded
  leaves live and returned replicated (no host ever holds a whole gradient)."""
  def groups(params, total):
    wg = jax.tree_util.tree_map(lambda w, g: jnp.abs(w.astype(jnp.float32) * g), params, total)
    return {a: group_reduce(wg, cfg, a, fn=lambda x: x, load=jnp.asarray) for a in _GROUP_AXES}
  return sharding.jit_on(groups, mesh)


def taylor_scores(params, cfg: LlamaConfig, batches: Iterable[np.ndarray],
                  progress=None, mesh: Mesh | None = None) -> Scores:
  """First-order Taylor importance |w * dL/dw| summed per group (LLM-Pruner), gradients of
  the LM loss accumulated over the calibration batches (float32, on device). With a `mesh`,
  params and the gradient sum are sharded by the rules and batch rows split as in
  `activation_scores`."""
  if mesh is not None:
    params = sharding.shard_params(params, cfg, mesh)
  step = _taylor_step(cfg, mesh)
  total, n = None, 0
  for tokens in batches:
    x, w = padded_batch(tokens, mesh)
    if w is None:
      w = np.ones(len(x), np.float32)
    if total is None:
      total = jax.tree_util.tree_map(lambda p: jnp.zeros(
          p.shape, jnp.float32, device=p.sharding if mesh is not None else None), params)
    total = step(params, x, w, total)
    n += len(tokens)
    if progress:
      progress(n)
  if total is None:
    raise ValueError("no calibration samples")
  if mesh is not None:
    per_axis = jax.device_get(_taylor_groups(cfg, mesh)(params, total))
    return _scores_from_groups({a: np.asarray(v, np.float64) for a, v in per_axis.items()},
                               cfg)
  wg = _abs_weight_times_grad(params, total)
  return _scores_from_groups({a: group_reduce(wg, cfg, a) for a in _GROUP_AXES}, cfg)


def random_scores(cfg: LlamaConfig, seed: int = 0) -> Scores:
  """Uniform random scores: the baseline every real criterion must beat."""
  rng = np.random.default_rng(seed)
  l, n, k = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
  return Scores(heads=rng.random((l, n)), neurons=rng.random((l, cfg.intermediate_size)),
                channels=rng.random(cfg.hidden_size), kv_groups=rng.random((l, k)))


def compute_scores(method: str, params, cfg: LlamaConfig, batches=None,
                   aggregation: Aggregation = Aggregation(), seed: int = 0,
                   progress=None, mesh: Mesh | None = None) -> Scores:
  if method not in METHODS:
    raise SettingError("importance", f"{{name}}={method!r} is not one of {METHODS}")
  if method == "activation":
    return activation_scores(params, cfg, batches, aggregation, progress, mesh)
  if method == "taylor":
    return taylor_scores(params, cfg, batches, progress, mesh)
  if method == "magnitude":
    return magnitude_scores(params, cfg)
  return random_scores(cfg, seed)
