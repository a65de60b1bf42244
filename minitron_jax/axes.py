"""The one table of parameters: logical axis names, HF tensor names and HF layouts.

Sharding (logical axis -> mesh axis), pruning (which axis to slice) and HF import/export
(transpose + reshape between our einsum layout and HF's `[out, in]` matrices) all read this
table; nothing else hard-codes an axis position.

Our layout keeps heads as their own axes (`q: (L, D, N, H)`), so per-head importance and
pruning need no reshapes; HF merges them (`q_proj.weight: (N*H, D)`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from minitron_jax.config import LlamaConfig

# Logical axis names.
VOCAB = "vocab"
EMBED = "embed"
Q_HEADS = "q_heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
LAYERS = "layers"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One parameter leaf.

  Attributes:
    path: keys into the nested param dict.
    axes: logical axis names of our array, in order.
    hf_name: HF tensor name; `{i}` is the layer index for stacked (`layers`-leading) leaves.
    hf_axes: HF's layout, one tuple of our axes per HF dimension (merged row-major).
  """

  path: tuple[str, ...]
  axes: tuple[str, ...]
  hf_name: str
  hf_axes: tuple[tuple[str, ...], ...]

  @property
  def stacked(self) -> bool:
    return self.axes[0] == LAYERS

  @property
  def name(self) -> str:
    return "/".join(self.path)


def _layer(name, axes, hf, hf_axes):
  return ParamSpec(("layers", name), (LAYERS, *axes), f"model.layers.{{i}}.{hf}", hf_axes)


PARAM_SPECS: tuple[ParamSpec, ...] = (
    ParamSpec(("embed",), (VOCAB, EMBED), "model.embed_tokens.weight", ((VOCAB,), (EMBED,))),
    _layer("attn_norm", (EMBED,), "input_layernorm.weight", ((EMBED,),)),
    _layer("q", (EMBED, Q_HEADS, HEAD_DIM), "self_attn.q_proj.weight",
           ((Q_HEADS, HEAD_DIM), (EMBED,))),
    _layer("k", (EMBED, KV_HEADS, HEAD_DIM), "self_attn.k_proj.weight",
           ((KV_HEADS, HEAD_DIM), (EMBED,))),
    _layer("v", (EMBED, KV_HEADS, HEAD_DIM), "self_attn.v_proj.weight",
           ((KV_HEADS, HEAD_DIM), (EMBED,))),
    _layer("o", (Q_HEADS, HEAD_DIM, EMBED), "self_attn.o_proj.weight",
           ((EMBED,), (Q_HEADS, HEAD_DIM))),
    _layer("mlp_norm", (EMBED,), "post_attention_layernorm.weight", ((EMBED,),)),
    _layer("gate", (EMBED, MLP), "mlp.gate_proj.weight", ((MLP,), (EMBED,))),
    _layer("up", (EMBED, MLP), "mlp.up_proj.weight", ((MLP,), (EMBED,))),
    _layer("down", (MLP, EMBED), "mlp.down_proj.weight", ((EMBED,), (MLP,))),
    ParamSpec(("final_norm",), (EMBED,), "model.norm.weight", ((EMBED,),)),
    ParamSpec(("lm_head",), (EMBED, VOCAB), "lm_head.weight", ((VOCAB,), (EMBED,))),
)


# Leaves only some families have (`LlamaConfig`'s switches): q/k/v biases follow their heads,
# q/k norms act on head_dim (shared by every head, so never pruned), Gemma's extra norms are
# hidden-sized like every other norm.
BIAS_SPECS: tuple[ParamSpec, ...] = (
    _layer("q_bias", (Q_HEADS, HEAD_DIM), "self_attn.q_proj.bias", ((Q_HEADS, HEAD_DIM),)),
    _layer("k_bias", (KV_HEADS, HEAD_DIM), "self_attn.k_proj.bias", ((KV_HEADS, HEAD_DIM),)),
    _layer("v_bias", (KV_HEADS, HEAD_DIM), "self_attn.v_proj.bias", ((KV_HEADS, HEAD_DIM),)),
)
QK_NORM_SPECS: tuple[ParamSpec, ...] = (
    _layer("q_norm", (HEAD_DIM,), "self_attn.q_norm.weight", ((HEAD_DIM,),)),
    _layer("k_norm", (HEAD_DIM,), "self_attn.k_norm.weight", ((HEAD_DIM,),)),
)
# Gemma's four norms per block: HF's `post_attention_layernorm` normalises the attention's
# output (Llama's is the MLP's input norm, our `mlp_norm`, which Gemma calls
# `pre_feedforward_layernorm`).
SANDWICH_SPECS: tuple[ParamSpec, ...] = (
    _layer("post_attn_norm", (EMBED,), "post_attention_layernorm.weight", ((EMBED,),)),
    _layer("post_mlp_norm", (EMBED,), "post_feedforward_layernorm.weight", ((EMBED,),)),
)
ALL_SPECS: tuple[ParamSpec, ...] = PARAM_SPECS + BIAS_SPECS + QK_NORM_SPECS + SANDWICH_SPECS
NORMS = ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm",
         "final_norm")


def param_specs(cfg: LlamaConfig) -> tuple[ParamSpec, ...]:
  """The specs present in a model (no `lm_head` when embeddings are tied; each family's own
  leaves after the attention projections they belong to)."""
  out = []
  for s in PARAM_SPECS:
    if cfg.tie_word_embeddings and s.path == ("lm_head",):
      continue
    if cfg.sandwich_norms and s.path == ("layers", "mlp_norm"):
      s = dataclasses.replace(s, hf_name="model.layers.{i}.pre_feedforward_layernorm.weight")
    out.append(s)
    if s.path == ("layers", "v") and cfg.attention_bias:
      out.extend(BIAS_SPECS)
    if s.path == ("layers", "o"):
      out.extend(QK_NORM_SPECS if cfg.qk_norm else ())
      out.extend(SANDWICH_SPECS[:1] if cfg.sandwich_norms else ())
    if s.path == ("layers", "down") and cfg.sandwich_norms:
      out.append(SANDWICH_SPECS[1])
  return tuple(out)


def is_matrix(spec: ParamSpec) -> bool:
  """Whether the leaf is a linear layer's weight (two HF dims), not a norm or a bias."""
  return len(spec.hf_axes) == 2


def is_norm(spec: ParamSpec) -> bool:
  return spec.path[-1] in NORMS


def axis_sizes(cfg: LlamaConfig) -> dict[str, int]:
  return {VOCAB: cfg.vocab_size, EMBED: cfg.hidden_size, Q_HEADS: cfg.num_attention_heads,
          KV_HEADS: cfg.num_key_value_heads, HEAD_DIM: cfg.head_dim,
          MLP: cfg.intermediate_size, LAYERS: cfg.num_hidden_layers}


def shape(spec: ParamSpec, cfg: LlamaConfig) -> tuple[int, ...]:
  sizes = axis_sizes(cfg)
  return tuple(sizes[a] for a in spec.axes)


def hf_shape(spec: ParamSpec, cfg: LlamaConfig) -> tuple[int, ...]:
  """Shape of one HF tensor (one layer for stacked leaves)."""
  sizes = axis_sizes(cfg)
  return tuple(int(np.prod([sizes[a] for a in group])) for group in spec.hf_axes)


def to_hf_layout(x: Any, spec: ParamSpec) -> Any:
  """Our array (one layer for stacked leaves) -> HF layout. Works for numpy and jax arrays."""
  axes = spec.axes[1:] if spec.stacked else spec.axes
  order = [axes.index(a) for group in spec.hf_axes for a in group]
  x = x.transpose(order) if order != sorted(order) else x
  dims, i = [], 0
  for group in spec.hf_axes:
    dims.append(int(np.prod(x.shape[i:i + len(group)])))
    i += len(group)
  return x.reshape(dims)


def from_hf_layout(x: Any, spec: ParamSpec, cfg: LlamaConfig, name: str | None = None) -> Any:
  """HF tensor (one layer for stacked leaves) -> our layout, checking its shape."""
  want = hf_shape(spec, cfg)
  if tuple(x.shape) != want:
    raise ValueError(f"tensor {name or spec.hf_name}: shape {tuple(x.shape)} disagrees with the "
                     f"config, expected {want}")
  sizes = axis_sizes(cfg)
  flat = [a for group in spec.hf_axes for a in group]
  x = x.reshape([sizes[a] for a in flat])
  axes = spec.axes[1:] if spec.stacked else spec.axes
  order = [flat.index(a) for a in axes]
  return x.transpose(order) if order != sorted(order) else x


def get(params: dict, spec: ParamSpec):
  for k in spec.path:
    params = params[k]
  return params


def iter_leaves(params: dict, cfg: LlamaConfig) -> Iterator[tuple[ParamSpec, Any]]:
  for spec in param_specs(cfg):
    yield spec, get(params, spec)


def tree_from_leaves(items) -> dict:
  """Nested param dict from (spec, value) pairs."""
  out: dict = {}
  for spec, value in items:
    node = out
    for k in spec.path[:-1]:
      node = node.setdefault(k, {})
    node[spec.path[-1]] = value
  return out
