"""Structured pruning: slice the param tree along ranked logical axes.

A `PrunePlan` holds the kept indices per logical axis (sorted, so kept units keep their
original order): hidden channels (`embed`, global), MLP neurons and query / KV heads (per
layer, same count in every layer), and whole layers. `prune` applies it to any leaf through
the axis table, so every place an axis occurs (embeddings, norms, projections, lm_head) is
sliced consistently. Query heads are chosen within each KV group, the same number per group,
so grouped-query attention stays valid.

Every family follows from the table: q/k/v biases go with their heads, per-head q/k norms act
on head_dim and are kept whole, every norm (Gemma's (1 + w) ones too) loses the pruned hidden
channels, a tied embedding is sliced once, Gemma's embedding scale keeps the teacher's value,
and each kept layer keeps its kind (`layer_types`: sliding or global, with its RoPE base).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax import axes
from minitron_jax import model as M
from minitron_jax.config import LlamaConfig, parse_layer_list
from minitron_jax.prune.importance import Scores
from minitron_jax.settings import SettingError


@dataclasses.dataclass(frozen=True)
class Targets:
  """Target architecture; None keeps the source value."""

  hidden_size: int | None = None
  intermediate_size: int | None = None
  num_attention_heads: int | None = None
  num_key_value_heads: int | None = None
  num_hidden_layers: int | None = None
  drop_layers: tuple[int, ...] | None = None

  @classmethod
  def from_flags(cls, cfg: LlamaConfig, *, drop_layers: str | None = None, **sizes
                 ) -> "Targets":
    dropped = (None if drop_layers is None
               else parse_layer_list(drop_layers, cfg.num_hidden_layers))
    return cls(drop_layers=dropped, **{k: v for k, v in sizes.items() if v is not None})

  def validate(self, cfg: LlamaConfig) -> LlamaConfig:
    """The target config; raises ValueError naming the offending target before any work."""
    for name in ("hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "num_hidden_layers"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
        raise SettingError(name, f"{{name}}={v!r} must be a positive integer")
      if v is not None and v > getattr(cfg, name):
        raise SettingError(name, f"{{name}}={v} is larger than the source model's "
                           f"{getattr(cfg, name)}")
    if self.drop_layers is not None and self.num_hidden_layers is not None:
      raise SettingError("drop_layers", "give either num_hidden_layers or {name}, not both")
    n = self.num_attention_heads or cfg.num_attention_heads
    k = self.num_key_value_heads or cfg.num_key_value_heads
    if n % k:
      raise SettingError("num_attention_heads", f"{{name}}={n} is not a multiple of "
                         f"num_key_value_heads={k} (query heads are kept per KV group)")
    if n // k > cfg.num_groups:
      raise ValueError(f"{n} query heads over {k} KV groups needs {n // k} per group, but the "
                       f"source has only {cfg.num_groups} per group")
    layers = cfg.num_hidden_layers
    if self.drop_layers is not None:
      if not self.drop_layers:
        raise SettingError("drop_layers", "{name} is empty")
      bad = [i for i in self.drop_layers if not 0 <= i < cfg.num_hidden_layers]
      if bad:
        raise SettingError("drop_layers", f"{{name}}: layer(s) {bad} out of range [0, "
                           f"{cfg.num_hidden_layers - 1}]")
      layers = cfg.num_hidden_layers - len(set(self.drop_layers))
      if layers < 1:
        raise SettingError("drop_layers", "{name} would remove every layer")
    elif self.num_hidden_layers is not None:
      layers = self.num_hidden_layers
    kept = ([i for i in range(cfg.num_hidden_layers) if i not in set(self.drop_layers)]
            if self.drop_layers is not None else range(layers))  # kinds: known once ranked
    return cfg.replace(hidden_size=self.hidden_size or cfg.hidden_size,
                       intermediate_size=self.intermediate_size or cfg.intermediate_size,
                       num_attention_heads=n, num_key_value_heads=k).keep_layers(kept)


@dataclasses.dataclass(frozen=True)
class PrunePlan:
  """Kept indices per axis (None = keep all). Per-layer axes are (L, n') arrays indexed by
  source layer; `layers` lists the kept source layers."""

  embed: np.ndarray | None = None
  mlp: np.ndarray | None = None
  q_heads: np.ndarray | None = None
  kv_heads: np.ndarray | None = None
  layers: np.ndarray | None = None

  def by_axis(self) -> dict[str, np.ndarray]:
    return {a: v for a, v in ((axes.EMBED, self.embed), (axes.MLP, self.mlp),
                              (axes.Q_HEADS, self.q_heads), (axes.KV_HEADS, self.kv_heads))
            if v is not None}

  def to_json(self) -> dict[str, Any]:
    return {k: (None if v is None else np.asarray(v).tolist())
            for k, v in dataclasses.asdict(self).items()}


def top_k_sorted(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k largest scores along the last axis, in ascending index order.
  Ties go to the lower index, so equal scores prune deterministically."""
  order = np.argsort(-np.asarray(scores, np.float64), axis=-1, kind="stable")[..., :k]
  return np.sort(order, axis=-1)


def select_heads(head_scores: np.ndarray, group_scores: np.ndarray, cfg: LlamaConfig,
                 num_heads: int, num_kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
  """(kv kept (L, K'), q kept (L, N')): the K' best KV groups per layer, then the best
  N'/K' query heads within each kept group (query head n belongs to group n // G)."""
  l, g = cfg.num_hidden_layers, cfg.num_groups
  kv_keep = top_k_sorted(group_scores, num_kv_heads)
  per_group = num_heads // num_kv_heads
  q_keep = np.zeros((l, num_heads), np.int64)
  for layer in range(l):
    cols = []
    for kv in kv_keep[layer]:
      within = top_k_sorted(head_scores[layer, kv * g:(kv + 1) * g], per_group)
      cols.extend(kv * g + within)
    q_keep[layer] = cols
  return kv_keep, q_keep


def cuts_width(cfg: LlamaConfig, new: LlamaConfig) -> bool:
  """Whether `new` drops any hidden channel, MLP neuron or head of `cfg` (not only layers)."""
  return (new.hidden_size, new.intermediate_size, new.num_attention_heads,
          new.num_key_value_heads) != (cfg.hidden_size, cfg.intermediate_size,
                                       cfg.num_attention_heads, cfg.num_key_value_heads)


def make_plan(cfg: LlamaConfig, targets: Targets, scores: Scores | None = None,
              layer_scores: np.ndarray | None = None, drop_block: bool = False) -> PrunePlan:
  """Ranks units by `scores` and keeps the most important ones to reach `targets`.

  Args:
    cfg: source config.
    targets: target sizes (validated here).
    scores: unit importance; required for any width target.
    layer_scores: (L,) importance per layer (higher = keep), for `num_hidden_layers` targets;
      with `drop_block`, (L-n+1,) damage of removing the contiguous block starting at i (the
      least damaging block is dropped).
  """
  new = targets.validate(cfg)
  if cuts_width(cfg, new) and scores is None:
    raise ValueError("width pruning needs importance scores")
  kw: dict[str, Any] = {}
  if new.hidden_size != cfg.hidden_size:
    kw["embed"] = top_k_sorted(scores.channels, new.hidden_size)
  if new.intermediate_size != cfg.intermediate_size:
    kw["mlp"] = top_k_sorted(scores.neurons, new.intermediate_size)
  if (new.num_attention_heads, new.num_key_value_heads) != (cfg.num_attention_heads,
                                                             cfg.num_key_value_heads):
    kv_keep, q_keep = select_heads(scores.heads, scores.kv_groups, cfg,
                                   new.num_attention_heads, new.num_key_value_heads)
    kw["q_heads"] = q_keep
    if new.num_key_value_heads != cfg.num_key_value_heads:
      kw["kv_heads"] = kv_keep
  if targets.drop_layers is not None:
    kw["layers"] = np.array([i for i in range(cfg.num_hidden_layers)
                             if i not in set(targets.drop_layers)])
  elif new.num_hidden_layers != cfg.num_hidden_layers:
    if layer_scores is None:
      raise SettingError("num_hidden_layers",
                         "{name} needs layer importance (or use drop_layers)")
    n_drop = cfg.num_hidden_layers - new.num_hidden_layers
    if drop_block:
      start = int(np.argmin(layer_scores))
      dropped = set(range(start, start + n_drop))
      kw["layers"] = np.array([i for i in range(cfg.num_hidden_layers) if i not in dropped])
    else:
      kw["layers"] = top_k_sorted(layer_scores, new.num_hidden_layers)
  return PrunePlan(**kw)


def pruned_config(cfg: LlamaConfig, plan: PrunePlan) -> LlamaConfig:
  sizes = {axes.EMBED: cfg.hidden_size, axes.MLP: cfg.intermediate_size,
           axes.Q_HEADS: cfg.num_attention_heads, axes.KV_HEADS: cfg.num_key_value_heads}
  for a, idx in plan.by_axis().items():
    sizes[a] = np.asarray(idx).shape[-1]
  kept = range(cfg.num_hidden_layers) if plan.layers is None else plan.layers
  return cfg.replace(hidden_size=sizes[axes.EMBED], intermediate_size=sizes[axes.MLP],
                     num_attention_heads=sizes[axes.Q_HEADS],
                     num_key_value_heads=sizes[axes.KV_HEADS]).keep_layers(kept)


def slice_leaf(x, spec_axes: tuple[str, ...], plan: PrunePlan, layer: int | None = None):
  """Slices one array whose axes are `spec_axes` (a stacked leaf, or one layer of it when
  `layer` is given and `layers` is absent from `spec_axes`)."""
  xp = jnp if isinstance(x, jax.Array) else np
  stacked = spec_axes[0] == axes.LAYERS
  for a, idx in plan.by_axis().items():
    if a not in spec_axes:
      continue
    pos = spec_axes.index(a)
    idx = np.asarray(idx)
    if idx.ndim == 1:
      x = xp.take(x, idx, axis=pos)
    elif stacked:  # per-layer indices: gather along `pos` with a leading layer axis
      shape = [1] * x.ndim
      shape[0], shape[pos] = idx.shape
      x = xp.take_along_axis(x, idx.reshape(shape), axis=pos)
    else:
      x = xp.take(x, idx[layer], axis=pos)
  if stacked and plan.layers is not None:
    x = x[np.asarray(plan.layers)]
  return x


def prune(params, cfg: LlamaConfig, plan: PrunePlan):
  """(params, config) of the pruned model."""
  leaves = [(s, slice_leaf(v, s.axes, plan)) for s, v in axes.iter_leaves(params, cfg)]
  new_cfg = pruned_config(cfg, plan)
  for s, v in leaves:
    if tuple(v.shape) != axes.shape(s, new_cfg):
      raise AssertionError(f"{s.name}: pruned shape {v.shape} != {axes.shape(s, new_cfg)}")
  return axes.tree_from_leaves(leaves), new_cfg


def plan_summary(cfg: LlamaConfig, plan: PrunePlan) -> Mapping[str, Any]:
  new = pruned_config(cfg, plan)
  return {"source": cfg.to_hf(), "target": new.to_hf(), "kept": plan.to_json(),
          "params_before": cfg.num_params(), "params_after": new.num_params()}


def prune_checkpoint(src_dir: str, out_dir: str, plan: PrunePlan, *, overwrite: bool = False,
                     max_shard_bytes: int | None = None,
                     extra_files=None) -> LlamaConfig:
  """Prunes an HF checkpoint on disk tensor by tensor: each source tensor is memory-mapped,
  sliced and written before the next is read, so a checkpoint larger than RAM can be pruned
  on a small host. Returns the pruned config."""
  from minitron_jax.io import hf as hf_io

  cfg = hf_io.load_config(src_dir)
  new = pruned_config(cfg, plan)
  files = hf_io.open_checkpoint(src_dir)
  kept_layers = (list(range(cfg.num_hidden_layers)) if plan.layers is None
                 else [int(i) for i in plan.layers])

  def produce(spec, name, src_layer):
    def f():
      if name not in files:
        raise hf_io.CheckpointError(f"{src_dir}: tensor {name} is missing")
      x = axes.from_hf_layout(np.asarray(files[name].get(name)), spec, cfg, name)
      layer_axes = spec.axes[1:] if spec.stacked else spec.axes
      return axes.to_hf_layout(np.ascontiguousarray(slice_leaf(x, layer_axes, plan, src_layer)),
                               spec)
    return f

  specs = axes.param_specs(cfg)
  order = ([(s, None) for s in specs if s.path == ("embed",)]
           + [(s, i) for i in range(new.num_hidden_layers) for s in specs if s.stacked]
           + [(s, None) for s in specs if s.path in (("final_norm",), ("lm_head",))])
  tensors = []
  for spec, new_layer in order:
    src_layer = None if new_layer is None else kept_layers[new_layer]
    src_name = spec.hf_name.format(i=src_layer)
    if src_name not in files:
      raise hf_io.CheckpointError(f"{src_dir}: tensor {src_name} is missing")
    tensors.append((spec.hf_name.format(i=new_layer), axes.hf_shape(spec, new),
                    files[src_name].dtype(src_name), produce(spec, src_name, src_layer)))
  tensors, written = _fold_embed_scale(tensors, new)
  with hf_io.atomic_output_dir(out_dir, overwrite) as tmp:
    hf_io.write_weights(tmp, tensors, max_shard_bytes or hf_io.DEFAULT_MAX_SHARD_BYTES)
    hf_io.write_config(tmp, written, torch_dtype=hf_io.torch_dtype_name(t[2] for t in tensors),
                       source_dir=src_dir)
    if extra_files is not None:
      extra_files(tmp)
  return new


def _fold_embed_scale(tensors: list, new: LlamaConfig) -> tuple[list, LlamaConfig]:
  """`model.fold_embed_scale` on streamed tensors: when the kept embedding scale differs from
  the one transformers derives, the embedding carries the ratio and, with a tied head, the
  final norm's gain is divided by it. Returns (tensors, the config written)."""
  want = new.hf_embed_scale
  if new.embed_scale == want:
    return tensors, new
  ratio = new.embed_scale / want

  def fold(name, shape, dtype, produce):
    if name == "model.embed_tokens.weight":
      return name, shape, dtype, lambda: (produce().astype(np.float32) * ratio).astype(dtype)
    if name == "model.norm.weight" and new.tie_word_embeddings:
      return name, shape, dtype, lambda: M.divide_norm_gain(produce(), ratio, new.norm_plus_one)
    return name, shape, dtype, produce

  return [fold(*t) for t in tensors], new.replace(embed_scale=want)
