"""Llama (and Mistral, Qwen2/2.5, Qwen3, Gemma 3) as pure functions over a nested dict of arrays.

Layers are stacked on a leading `layers` axis and run under `jax.lax.scan`, so compile time
does not grow with depth and depth pruning is a slice. One block function serves training,
evaluation, prefill and cached decode; `taps` lets a caller reduce any intermediate
activation inside the scan (importance estimation) without a second code path.

The families differ only by `LlamaConfig`'s switches, read here in one block: q/k/v biases,
per-head q/k norms, (1 + w) norms, an embedding scale, GeGLU, Gemma's sandwich norms, the
attention scale, and sliding-window layers with their own RoPE base. A layer's kind (global or
sliding) is scanned along with its params, so depth pruning keeps each layer's kind.

Shape letters: B batch, T query length, S key length, D hidden, N query heads, K KV heads,
H head dim, F MLP width, V vocab, L layers.

Activations are pinned to the parameters' logical axes (`sharding.constrain`, by the same rules
table) when a mesh is set, and left to XLA otherwise.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax import attention, axes, sharding
from minitron_jax.config import LlamaConfig, rope_inv_freq_and_scale

Params = dict[str, Any]
# name -> fn(activation) -> reduced value; applied per layer inside the scan.
Taps = Mapping[str, Callable[[jax.Array], Any]]
# Logical axes of activations (`sharding.RULES`).
BTD = ("batch", "seq", axes.EMBED)
BTNH = ("batch", "seq", axes.Q_HEADS, axes.HEAD_DIM)
BTKH = ("batch", "seq", axes.KV_HEADS, axes.HEAD_DIM)
BTF = ("batch", "seq", axes.MLP)
BTV = ("batch", "seq", axes.VOCAB)
# Per-layer taps (stacked over layers), plus "final_norm" (the normed input of the LM head).
# Tokens per row whose logits exist at once in losses and scoring (`chunked_token_map`): at a
# 128K vocabulary, 512 tokens of float32 logits are 256 MiB per row, against 4 GiB at T = 8192.
LOGITS_CHUNK = 512
# "attn_out" / "mlp_out" are the sandwich norms' outputs (Gemma), added to the residual stream.
TAP_NAMES = ("block_in", "attn_in", "attn_heads", "attn_out", "mlp_in", "mlp_act", "mlp_out",
             "block_out", "block_io", "final_norm")


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02
                ) -> Params:
  """Random params (normal(0, std) matrices and biases, unit norms: weights of one, or of
  zero for (1 + w) norms), laid out as `axes.param_specs(cfg)`."""
  specs = axes.param_specs(cfg)
  keys = jax.random.split(key, len(specs))
  leaves = []
  for k, spec in zip(keys, specs):
    shp = axes.shape(spec, cfg)
    if axes.is_norm(spec):
      leaves.append((spec, jnp.full(shp, 0.0 if cfg.norm_plus_one else 1.0, dtype)))
    else:
      leaves.append((spec, (std * jax.random.normal(k, shp, jnp.float32)).astype(dtype)))
  return axes.tree_from_leaves(leaves)


def weight(leaf, dtype) -> jax.Array:
  """A parameter in the compute dtype. Quantized leaves (anything with `dequantize(dtype)`)
  are dequantized here, inside the jitted computation, so XLA fuses it into the matmul."""
  if hasattr(leaf, "dequantize"):
    return leaf.dequantize(dtype)
  return leaf.astype(dtype)


def linear_input(x, leaf):
  """`x` as the linear layer `leaf` reads it: a leaf with static activation scales
  (`quantize_input`, W8A8 FP8) rounds it onto its FP8 grid; any other leaf reads `x` as is."""
  return leaf.quantize_input(x) if hasattr(leaf, "quantize_input") else x


def wide(dtype) -> jnp.dtype:
  """The dtype norms, RoPE angles, logits and log-softmax compute in for a `dtype` input:
  float32 for every narrower float, float64 for float64 (a reference run)."""
  return jnp.promote_types(dtype, jnp.float32)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
  """HF LlamaRMSNorm: normalise in float32 (`wide`), cast back, then scale. `plus_one` is
  Gemma's: scale by (1 + w) in float32, then cast back."""
  w = wide(x.dtype)
  x32 = x.astype(w)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if plus_one:
    return (x32 * (1.0 + scale.astype(w))).astype(x.dtype)
  return scale.astype(x.dtype) * x32.astype(x.dtype)


def norm(cfg: LlamaConfig, x: jax.Array, scale: jax.Array) -> jax.Array:
  """The model's RMSNorm (`cfg.norm_plus_one` picks Gemma's (1 + w))."""
  return rms_norm(x, scale, cfg.rms_norm_eps, cfg.norm_plus_one)


def activation(cfg: LlamaConfig, x: jax.Array) -> jax.Array:
  """The gate's activation: SiLU (SwiGLU) or tanh-approximated GELU (Gemma's GeGLU)."""
  if cfg.hidden_act == "gelu_pytorch_tanh":
    return jax.nn.gelu(x, approximate=True)
  return jax.nn.silu(x)


def rope_tables(cfg: LlamaConfig, positions_bt: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """cos/sin of shape (B, T, H) for HF's rotate-half layout."""
  inv_freq, scale = rope_inv_freq_and_scale(cfg)
  freqs_btf = positions_bt.astype(wide(dtype))[..., None] * jnp.asarray(inv_freq, wide(dtype))
  emb_bth = jnp.concatenate([freqs_btf, freqs_btf], axis=-1)
  return (jnp.cos(emb_bth) * scale).astype(dtype), (jnp.sin(emb_bth) * scale).astype(dtype)


def sliding_flags(cfg: LlamaConfig) -> jax.Array:
  """(L,) bool: which layers are sliding-window (local) layers; scanned with the params."""
  return jnp.asarray(cfg.sliding_layers, bool)


def layer_setup(cfg: LlamaConfig, positions_bt: jax.Array, dtype, make_attend: Callable):
  """RoPE tables and attention per kind of layer.

  Args:
    cfg: model config.
    positions_bt: RoPE positions.
    dtype: compute dtype of the tables.
    make_attend: window (int or None) -> `attend(q_btnh, k_bskh, v_bskh)`.

  Returns:
    `pick(sliding) -> (cos_bth, sin_bth, attend)` for a layer whose `sliding_flags` entry is
    `sliding` (traced inside the layer scan; a model with one kind of layer ignores it).
  """
  kinds = set(cfg.sliding_layers)
  glob = (*rope_tables(cfg, positions_bt, dtype), make_attend(None))
  if kinds == {False}:
    return lambda sliding: glob
  local_tables = (rope_tables(cfg.local_rope(), positions_bt, dtype)
                  if cfg.rope_local_base_freq is not None else glob[:2])
  local = (*local_tables, make_attend(cfg.sliding_window))
  if kinds == {True}:
    return lambda sliding: local

  def pick(sliding):
    def attend(q_btnh, k_bskh, v_bskh):
      return jax.lax.cond(sliding, local[2], glob[2], q_btnh, k_bskh, v_bskh)
    return jnp.where(sliding, local[0], glob[0]), jnp.where(sliding, local[1], glob[1]), attend
  return pick


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
  h = x_btnh.shape[-1] // 2
  rot = jnp.concatenate([-x_btnh[..., h:], x_btnh[..., :h]], axis=-1)
  return x_btnh * cos_bth[:, :, None, :] + rot * sin_bth[:, :, None, :]


def _qkv(cfg: LlamaConfig, lp: Params, h_btd):
  """q, k, v of one layer before RoPE: projections, biases (Qwen2), per-head norms (Qwen3,
  Gemma 3), in HF's order."""
  dt = h_btd.dtype
  q_btnh = jnp.einsum("BTD,DNH->BTNH", h_btd, weight(lp["q"], dt))
  k_btkh = jnp.einsum("BTD,DKH->BTKH", h_btd, weight(lp["k"], dt))
  v_btkh = jnp.einsum("BTD,DKH->BTKH", h_btd, weight(lp["v"], dt))
  if cfg.attention_bias:
    q_btnh = q_btnh + weight(lp["q_bias"], dt)
    k_btkh = k_btkh + weight(lp["k_bias"], dt)
    v_btkh = v_btkh + weight(lp["v_bias"], dt)
  if cfg.qk_norm:
    q_btnh = norm(cfg, q_btnh, lp["q_norm"])
    k_btkh = norm(cfg, k_btkh, lp["k_norm"])
  return q_btnh, k_btkh, v_btkh


def _block(cfg: LlamaConfig, lp: Params, x_btd, cos_bth, sin_bth, attend, kv_cache,
           taps: Taps):
  """One decoder layer. Returns (x_btd, the updated cache or None, tap outputs).

  `attend(q_btnh, k_bskh, v_bskh)` is the attention (see `attention.attend`). `kv_cache`,
  when given, maps this step's (k_btkh, v_btkh) to (keys, values to attend to, updated
  cache); see `forward_cached`.
  """
  dt = x_btd.dtype
  out = {}

  def tap(name, value):
    if name in taps:
      out[name] = taps[name](value)

  tap("block_in", x_btd)
  x_in_btd = x_btd
  h_btd = norm(cfg, x_btd, lp["attn_norm"])
  tap("attn_in", h_btd)
  q_btnh, k_btkh, v_btkh = _qkv(cfg, lp, linear_input(h_btd, lp["q"]))  # one input scale
  q_btnh = sharding.constrain(apply_rope(q_btnh, cos_bth, sin_bth), BTNH)
  k_btkh = sharding.constrain(apply_rope(k_btkh, cos_bth, sin_bth), BTKH)
  v_btkh = sharding.constrain(v_btkh, BTKH)
  new_cache = None
  if kv_cache is not None:
    k_btkh, v_btkh, new_cache = kv_cache(k_btkh, v_btkh)
  attn_btnh = sharding.constrain(attend(q_btnh, k_btkh, v_btkh), BTNH)
  tap("attn_heads", attn_btnh)
  attn_btnh = linear_input(attn_btnh, lp["o"])
  out_btd = jnp.einsum("BTNH,NHD->BTD", attn_btnh, weight(lp["o"], dt))
  if cfg.sandwich_norms:
    out_btd = norm(cfg, out_btd, lp["post_attn_norm"])
    tap("attn_out", out_btd)
  x_btd = sharding.constrain(x_btd + out_btd, BTD)
  h_btd = norm(cfg, x_btd, lp["mlp_norm"])
  tap("mlp_in", h_btd)
  h_btd = linear_input(h_btd, lp["gate"])
  gate_btf = jnp.einsum("BTD,DF->BTF", h_btd, weight(lp["gate"], dt))
  up_btf = jnp.einsum("BTD,DF->BTF", h_btd, weight(lp["up"], dt))
  act_btf = sharding.constrain(activation(cfg, gate_btf) * up_btf, BTF)
  tap("mlp_act", act_btf)
  act_btf = linear_input(act_btf, lp["down"])
  out_btd = jnp.einsum("BTF,FD->BTD", act_btf, weight(lp["down"], dt))
  if cfg.sandwich_norms:
    out_btd = norm(cfg, out_btd, lp["post_mlp_norm"])
    tap("mlp_out", out_btd)
  x_btd = sharding.constrain(x_btd + out_btd, BTD)
  tap("block_out", x_btd)
  if "block_io" in taps:
    out["block_io"] = taps["block_io"]((x_in_btd, x_btd))
  return x_btd, new_cache, out


def embed(params: Params, cfg: LlamaConfig, tokens_bt: jax.Array) -> jax.Array:
  table = params["embed"]
  if hasattr(table, "take_rows"):  # quantized: dequantize only the gathered rows
    x_btd = table.take_rows(tokens_bt, jnp.dtype(cfg.dtype))
  else:
    x_btd = jnp.take(table, tokens_bt, axis=0).astype(jnp.dtype(cfg.dtype))
  if cfg.embed_scale != 1.0:  # Gemma: the scale rounded to the compute dtype, as HF does
    x_btd = x_btd * jnp.asarray(cfg.embed_scale, x_btd.dtype)
  return sharding.constrain(x_btd, BTD)


def fold_embed_scale(params: Params, cfg: LlamaConfig) -> tuple[Params, LlamaConfig]:
  """The same model with the embedding scale transformers derives (`cfg.hf_embed_scale`).

  A width-pruned Gemma keeps its teacher's sqrt(hidden), which transformers would recompute
  from the smaller `hidden_size`. The ratio r goes into the embedding table; a tied LM head,
  which then reads r times the table, gets the final norm's gain divided by r
  (`divide_norm_gain`), so the head stays tied and nothing is added. Equal up to rounding.
  """
  want = cfg.hf_embed_scale
  if cfg.embed_scale == want:
    return params, cfg
  table = params["embed"]
  if hasattr(table, "dequantize"):
    raise ValueError(f"embed_scale {cfg.embed_scale} differs from the {want} HF derives, and a "
                     "quantized embedding table cannot absorb the ratio")
  ratio = cfg.embed_scale / want
  out = {**params, "embed": (table.astype(jnp.float32) * ratio).astype(table.dtype)}
  if cfg.tie_word_embeddings:
    out["final_norm"] = jnp.asarray(divide_norm_gain(params["final_norm"], ratio,
                                                     cfg.norm_plus_one))
  return out, cfg.replace(embed_scale=want)


def divide_norm_gain(w, ratio: float, plus_one: bool) -> np.ndarray:
  """The norm weight whose gain (w, or Gemma's 1 + w) is `ratio` times smaller, in numpy
  float32 (the in-memory and the streamed export agree bit for bit), stored in `w`'s dtype."""
  w32, r = np.asarray(w, np.float32), np.float32(ratio)
  return ((1 + w32) / r - 1 if plus_one else w32 / r).astype(w.dtype)


def unembed(params: Params, cfg: LlamaConfig, x_btd: jax.Array, normed: bool = False
            ) -> jax.Array:
  """Final norm (unless `normed`) and LM head; logits in float32 (`wide`)."""
  if not normed:
    x_btd = norm(cfg, x_btd, params["final_norm"])
  if cfg.tie_word_embeddings:
    logits = jnp.einsum("BTD,VD->BTV", x_btd, weight(params["embed"], x_btd.dtype))
  else:
    logits = jnp.einsum("BTD,DV->BTV", x_btd, weight(params["lm_head"], x_btd.dtype))
  return sharding.constrain(logits.astype(wide(logits.dtype)), BTV)


def forward(params: Params, cfg: LlamaConfig, tokens_bt: jax.Array, *,
            positions_bt: jax.Array | None = None, segment_ids_bt: jax.Array | None = None,
            taps: Taps | None = None, return_hidden: bool = False,
            remat: bool = False, layer_mask: jax.Array | None = None,
            logits: bool = True) -> dict[str, Any]:
  """Full-sequence forward.

  Args:
    params: param tree (see `axes.PARAM_SPECS`).
    cfg: model config; `cfg.dtype` is the compute dtype.
    tokens_bt: int token ids.
    positions_bt: RoPE positions; default `arange(T)` (restart per document when packing).
    segment_ids_bt: document ids for packed batches (0 = padding); None means one causal
      sequence per row. Attention takes them without a (T, T) mask where the kernel
      (`cfg.attention_impl`) allows; padding positions' outputs are unspecified.
    taps: per-layer reductions of intermediate activations (names in `TAP_NAMES`).
    return_hidden: also return every layer's output, stacked `(L, B, T, D)`.
    remat: rematerialise each layer in the backward pass.
    layer_mask: optional (L,) bool; a False layer is skipped (its input passes through, and
      it is not computed), which equals removing it, without a new compile per choice of
      layers.
    logits: False returns the final-normed states `normed` (B, T, D) instead of `logits`, for
      losses that project them a chunk of tokens at a time (`chunked_token_map`) and so never
      hold the whole (B, T, V).

  Returns:
    dict with `logits` (B, T, V) float32 (or `normed`), `embeddings` (B, T, D), and
    optionally `hidden` (L, B, T, D) and `taps` (name -> value stacked over layers).
  """
  taps = dict(taps or {})
  unknown = set(taps) - set(TAP_NAMES)
  if unknown:
    raise ValueError(f"unknown taps {sorted(unknown)}; known: {TAP_NAMES}")
  b, t = tokens_bt.shape
  if positions_bt is None:
    positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  dt = jnp.dtype(cfg.dtype)
  x_btd = embed(params, cfg, tokens_bt)
  setup = layer_setup(cfg, positions_bt, dt, lambda window: functools.partial(
      attention.attend, segment_ids_bt=segment_ids_bt, scale=cfg.attn_scale,
      impl=cfg.attention_impl, window=window))
  final_tap = taps.pop("final_norm", None)
  keep_l = jnp.ones((cfg.num_hidden_layers,), bool) if layer_mask is None else layer_mask

  def block(x, lp, sliding):
    cos_bth, sin_bth, attend = setup(sliding)
    y, _, tapped = _block(cfg, lp, x, cos_bth, sin_bth, attend, None, taps)
    return y, tapped

  def body(x, layer):
    lp, keep, sliding = layer
    if layer_mask is None:
      y, tapped = block(x, lp, sliding)
    else:  # a skipped layer costs nothing: its input passes through, its taps are zeros
      def skip(x, lp, sliding):
        shapes = jax.eval_shape(block, x, lp, sliding)[1]
        return x, jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      y, tapped = jax.lax.cond(keep, block, skip, x, lp, sliding)
    return y, (y if return_hidden else None, tapped)

  if remat:
    body = jax.checkpoint(body)
  x_last, (hidden, tapped) = jax.lax.scan(
      body, x_btd, (params["layers"], keep_l, sliding_flags(cfg)))
  normed_btd = norm(cfg, x_last, params["final_norm"])
  out = {"embeddings": x_btd}
  if logits:
    out["logits"] = unembed(params, cfg, normed_btd, normed=True)
  else:
    out["normed"] = normed_btd
  if final_tap is not None:
    tapped["final_norm"] = final_tap(normed_btd)
  if return_hidden:
    out["hidden"] = hidden
  if taps or final_tap is not None:
    out["taps"] = tapped
  return out


# ---------------------------------------------------------------------------- KV cache


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
  """Empty KV cache: keys/values per layer, which slots hold real tokens, next positions."""
  dtype = dtype or jnp.dtype(cfg.dtype)
  shp = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
  return {"k": jnp.zeros(shp, dtype), "v": jnp.zeros(shp, dtype),
          "valid": jnp.zeros((batch, max_len), bool),
          "index": jnp.zeros((), jnp.int32),
          "next_position": jnp.zeros((batch,), jnp.int32)}


def forward_cached(params: Params, cfg: LlamaConfig, tokens_bt: jax.Array,
                   valid_bt: jax.Array, cache: dict[str, jax.Array], attend_len: int | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Appends `T` tokens per row to the cache and returns their logits.

  All rows advance together (slot `cache['index']` onwards); `valid_bt` marks real tokens, so
  left-padded prompts of different lengths share one cache. RoPE positions count real tokens
  only, so a row's result does not depend on its padding.

  The whole (L, B, S, K, H) cache is the layer scan's carry and each layer writes its new
  keys/values with one `dynamic_update_slice`, so under `jax.jit` with the cache donated XLA
  updates the buffers in place instead of re-stacking every layer's cache per call.

  Args:
    params: param tree.
    cfg: model config.
    tokens_bt: int token ids to append.
    valid_bt: bool, which of them are real tokens.
    cache: from `init_cache` or a previous call.
    attend_len: static number of leading cache slots attention reads; must cover the filled
      slots (`index + T`). Slots past the filled length are masked anyway, so any covering
      length gives the same logits; callers pass a bucket of the filled length so decode cost
      follows the filled length while only a few shapes compile. Default: the whole cache.
  """
  b, t = tokens_bt.shape
  s = cache["k"].shape[2]
  a = s if attend_len is None else int(attend_len)
  if not t <= a <= s:
    raise ValueError(f"attend_len {a} must be in [{t}, {s}] (new tokens, cache length)")
  dt = jnp.dtype(cfg.dtype)
  idx = cache["index"]
  positions_bt = cache["next_position"][:, None] + jnp.cumsum(valid_bt, axis=1) - 1
  positions_bt = jnp.maximum(positions_bt, 0).astype(jnp.int32)
  valid_bs = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid_bt, idx, axis=1)
  slot_q_t = idx + jnp.arange(t)
  causal_ta = jnp.arange(a)[None, :] <= slot_q_t[:, None]
  self_ta = jnp.arange(a)[None, :] == slot_q_t[:, None]
  mask_bta = causal_ta[None] & valid_bs[:, None, :a]
  x_btd = embed(params, cfg, tokens_bt)
  zero = jnp.zeros((), jnp.int32)

  def make_attend(window):  # a few queries over the cache: an explicit mask is small
    mask = mask_bta
    if window is not None:  # the window counts real tokens (RoPE positions), not padding
      key_pos_ba = jnp.cumsum(valid_bs[:, :a], axis=1) - 1
      mask = mask & (key_pos_ba[:, None, :] > positions_bt[:, :, None] - window)
    mask_b1ta = (mask | self_ta[None])[:, None]
    return lambda q_btnh, k_bakh, v_bakh: jax.nn.dot_product_attention(
        q_btnh, k_bakh, v_bakh, mask=mask_b1ta, scale=cfg.attn_scale)

  setup = layer_setup(cfg, positions_bt, dt, make_attend)

  def body(carry, layer_in):
    x, k_lbskh, v_lbskh, layer = carry
    lp, sliding = layer_in
    cos_bth, sin_bth, attend = setup(sliding)

    def kv_cache(k_btkh, v_btkh):
      at = (layer, zero, idx, zero, zero)
      k_lbskh2 = jax.lax.dynamic_update_slice(k_lbskh, k_btkh[None].astype(k_lbskh.dtype), at)
      v_lbskh2 = jax.lax.dynamic_update_slice(v_lbskh, v_btkh[None].astype(v_lbskh.dtype), at)
      start, size = (layer, zero, zero, zero, zero), (1, b, a) + k_lbskh.shape[3:]
      k_bakh = jax.lax.dynamic_slice(k_lbskh2, start, size)[0].astype(dt)
      v_bakh = jax.lax.dynamic_slice(v_lbskh2, start, size)[0].astype(dt)
      return k_bakh, v_bakh, (k_lbskh2, v_lbskh2)

    y, (k_lbskh, v_lbskh), _ = _block(cfg, lp, x, cos_bth, sin_bth, attend, kv_cache, {})
    return (y, k_lbskh, v_lbskh, layer + 1), None

  (x_btd, k, v, _), _ = jax.lax.scan(body, (x_btd, cache["k"], cache["v"], zero),
                                     (params["layers"], sliding_flags(cfg)))
  new_cache = {"k": k, "v": v, "valid": valid_bs, "index": idx + t,
               "next_position": cache["next_position"] + valid_bt.sum(axis=1).astype(jnp.int32)}
  return unembed(params, cfg, x_btd), new_cache


def num_params(params: Params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def token_nll_bt(logits_btv: jax.Array, labels_bt: jax.Array) -> jax.Array:
  """-log p(label) per token, (B, T) float32 (`wide`): the one next-token NLL that losses,
  perplexity, task scoring and importance all use."""
  logp_btv = jax.nn.log_softmax(logits_btv.astype(wide(logits_btv.dtype)), axis=-1)
  return -jnp.take_along_axis(logp_btv, labels_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]


def chunked_token_map(fn: Callable[..., Any], chunk: int, *args_bt: jax.Array) -> Any:
  """`fn` over chunks of `chunk` tokens, one at a time: fn(*args_bt) without its peak memory.

  `fn` maps arrays whose axis 1 is tokens (B, c, ...) to a pytree of per-token values (B, c)
  and must treat tokens independently (e.g. project to logits, then a per-token loss). The
  chunks run in a `lax.scan` whose body is under `jax.checkpoint`, so neither the forward nor
  the backward pass holds more than one chunk's intermediates (the (B, c, V) logits): the
  backward recomputes them chunk by chunk. The token axis is zero-padded to a multiple of
  `chunk` and the padding's values are dropped. `chunk` <= 0 or >= T: one call of `fn`.
  """
  t = args_bt[0].shape[1]
  if chunk <= 0 or chunk >= t:
    return fn(*args_bt)
  n = -(-t // chunk)

  def split(x):  # (B, T, ...) -> (n, B, c, ...), zero-padded
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, n * chunk - t)
    x = jnp.pad(x, pad)
    x = x.reshape(x.shape[0], n, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  def body(_, xs):
    return None, fn(*xs)

  _, out = jax.lax.scan(jax.checkpoint(body), None, tuple(split(x) for x in args_bt))
  # (n, B, c) -> (B, n * c) -> (B, T)
  return jax.tree_util.tree_map(
      lambda y: jnp.moveaxis(y, 0, 1).reshape(y.shape[1], n * chunk, *y.shape[3:])[:, :t], out)


def token_scores_bt(params: Params, cfg: LlamaConfig, normed_btd: jax.Array,
                    labels_bt: jax.Array, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """Next-token NLL (`token_nll_bt`) and whether the label is the argmax, both (B, T), from
  the final-normed states (`forward(..., logits=False)`), `chunk` tokens of logits at a time."""
  def score(x_bcd, labels_bc):
    logits_bcv = unembed(params, cfg, x_bcd, normed=True)
    return token_nll_bt(logits_bcv, labels_bc), jnp.argmax(logits_bcv, axis=-1) == labels_bc
  return chunked_token_map(score, chunk, normed_btd, labels_bt)
