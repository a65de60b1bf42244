"""Causal self-attention within packed documents, without a (B, 1, T, T) mask where a kernel
takes segment ids.

Every implementation computes softmax(q k^T * scale) v for each query over the keys at or
before it with the same segment id (0 = padding). Padding queries' outputs are unspecified
(finite) and are never used: losses mask them and real queries never attend to padding keys.

- "xla": `jax.nn.dot_product_attention` with the explicit boolean mask; the reference, and the
  CPU path. Without segment ids it is plain causal attention (no mask array). A float64 model
  (a reference run) gets the same math with its softmax in float64 too.
- "splash": Pallas splash attention (TPU), segment ids and a causal mask inside the kernel,
  one kernel per KV head over its group of query heads (GQA without repeating K/V).
- "pallas_gpu": the Pallas (Triton) flash attention kernel for GPUs, which takes segment ids;
  K/V heads are repeated to the query heads (it has no GQA grouping), which costs T x N x H,
  not T^2.
- "cudnn": cuDNN flash attention through `jax.nn.dot_product_attention`; it has no segment
  ids, so only unpacked rows (no `segment_ids_bt`) can use it.
- "auto": splash on TPU; on GPU cudnn for unpacked rows and pallas_gpu for packed ones; xla
  elsewhere.

A sliding-window layer (`window`, Mistral's and Gemma 3's local layers) also drops keys `window`
or more positions before the query (HF's `kv_idx > q_idx - window`): a mask term on the XLA
path, `local_window_size` for cuDNN, a `LocalMask` in splash; the Pallas GPU kernel has no
window and refuses one shorter than the sequence. A window as long as the sequence changes
nothing and is dropped.

The Pallas kernels need the sequence in whole blocks, so T is zero-padded (segment id 0, after
every real token, hence never attended to by a real query) and the outputs cut back. On CPU they
run in Pallas' interpreter (`interpret=True`), which is how their parity is tested. XLA cannot
partition a Pallas kernel, so when a mesh is set (`sharding.use_mesh`) they run under
`shard_map`: rows split as the rules split "batch", heads as they split the head axes (when
both the query and KV head counts divide), the sequence whole on every device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from minitron_jax import axes, sharding
from minitron_jax.config import ATTENTION_IMPLS


def resolve_impl(impl: str, packed: bool, platform: str | None = None) -> str:
  """The implementation "auto" means on this backend (others are returned as they are)."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  platform = platform or sharding.mesh_platform()
  if platform == "tpu":
    return "splash"
  if platform in ("gpu", "cuda", "rocm"):
    return "pallas_gpu" if packed else "cudnn"
  return "xla"


def window_mask(t: int, window: int | None) -> jax.Array:
  """(T, T) causal mask, within `window` positions when one is given (the query included)."""
  q_t1, k_1t = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  mask = k_1t <= q_t1
  return mask if window is None else mask & (k_1t > q_t1 - window)


def segment_mask(segment_ids_bt: jax.Array, window: int | None = None) -> jax.Array:
  """Causal mask within segments, (B, 1, T, T), segment 0 = padding; the reference path's.

  A padding query attends to itself only, so its (discarded) output stays finite.
  """
  t = segment_ids_bt.shape[1]
  causal_tt = window_mask(t, window)
  same_btt = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
  real_bt = segment_ids_bt != 0
  mask = causal_tt[None] & same_btt & real_bt[:, None, :]
  return (mask | jnp.eye(t, dtype=bool)[None])[:, None]


def attend(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
           segment_ids_bt: jax.Array | None, *, scale: float, impl: str = "auto",
           window: int | None = None) -> jax.Array:
  """Causal (within-segment) attention, (B, T, N, H); K/V heads are shared by N/K query heads.

  Args:
    q_btnh, k_btkh, v_btkh: queries, keys, values (RoPE applied).
    segment_ids_bt: document ids of packed rows (0 = padding), or None: one causal sequence.
    scale: logit scale (head_dim ** -0.5).
    impl: one of `config.ATTENTION_IMPLS`.
    window: a sliding-window layer's window (keys within `window` positions, the query's own
      included), or None.
  """
  t = q_btnh.shape[1]
  if window is not None and window >= t:
    window = None
  chosen, impl = impl, resolve_impl(impl, segment_ids_bt is not None)
  if chosen == "auto" and impl == "pallas_gpu" and window is not None:
    impl = "xla"  # the one GPU path with segment ids and a window
  if impl == "xla":
    if segment_ids_bt is not None:
      mask = segment_mask(segment_ids_bt, window)
    else:
      mask = None if window is None else window_mask(t, window)[None, None]
    if q_btnh.dtype == jnp.float64:
      causal = window_mask(t, None)[None, None] if mask is None else mask
      return _float64_attention(q_btnh, k_btkh, v_btkh, causal, scale)
    return jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=mask,
                                        is_causal=mask is None, scale=scale)
  if impl == "cudnn":
    if segment_ids_bt is not None:
      raise ValueError("attention_impl='cudnn' takes no segment ids (packed rows): use "
                       "'pallas_gpu' or 'auto'")
    return jax.nn.dot_product_attention(
        q_btnh, k_btkh, v_btkh, is_causal=True, scale=scale, implementation="cudnn",
        local_window_size=None if window is None else (window - 1, 0))
  if impl == "pallas_gpu" and window is not None:
    raise ValueError(f"attention_impl='pallas_gpu' has no sliding window ({window} < {t} "
                     "tokens): use 'xla', or 'cudnn' for unpacked rows")
  interpret = sharding.mesh_platform() == "cpu"
  if segment_ids_bt is None:
    segment_ids_bt = jnp.ones(q_btnh.shape[:2], jnp.int32)
  kernel = functools.partial(_splash, window=window) if impl == "splash" else _pallas_gpu
  kernel = functools.partial(kernel, scale=scale, interpret=interpret)
  mesh = sharding.active_mesh()
  if mesh is None:
    return kernel(q_btnh, k_btkh, v_btkh, segment_ids_bt)
  return _shard_mapped(kernel, mesh, q_btnh, k_btkh, v_btkh, segment_ids_bt)


def _float64_attention(q_btnh, k_btkh, v_btkh, mask, scale: float) -> jax.Array:
  """The XLA path with every step in float64 (a float64 model is a reference run;
  `jax.nn.dot_product_attention` takes its softmax in float32). `mask` broadcasts to
  (B, N, T, S)."""
  group = q_btnh.shape[2] // k_btkh.shape[2]
  k_bsnh, v_bsnh = (jnp.repeat(x, group, axis=2) for x in (k_btkh, v_btkh))
  logits_bnts = jnp.einsum("BTNH,BSNH->BNTS", q_btnh, k_bsnh) * scale
  logits_bnts = jnp.where(mask, logits_bnts, jnp.finfo(jnp.float64).min)
  return jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits_bnts, axis=-1), v_bsnh)


def _shard_mapped(kernel, mesh, q_btnh, k_btkh, v_btkh, seg_bt):
  """`kernel` per device: rows and heads split by the rules, each device's sequence whole."""
  q_spec = sharding.activation_spec(q_btnh.shape, ("batch", None, axes.Q_HEADS, None), mesh)
  k_spec = sharding.activation_spec(k_btkh.shape, ("batch", None, axes.KV_HEADS, None), mesh)
  if q_spec[2] != k_spec[2]:  # one head count does not divide: keep the groups whole
    q_spec = P(q_spec[0], None, None, None)
    k_spec = P(k_spec[0], None, None, None)
  seg_spec = P(q_spec[0], None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, seg_spec),
                       out_specs=q_spec, check_vma=False)(q_btnh, k_btkh, v_btkh, seg_bt)


def _pad_tokens(block: int, *xs_bt):
  """Zero-pads axis 1 of every array to a multiple of `block`."""
  t = xs_bt[0].shape[1]
  extra = -t % block
  if not extra:
    return xs_bt
  return tuple(jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)) for x in xs_bt)


def _block_size(t: int, largest: int) -> int:
  """A kernel block: `largest`, or the sequence rounded up to 128 if that is shorter."""
  return min(largest, -(-t // 128) * 128)


def _splash_kernel(t: int, groups: int, block: int, interpret: bool, window: int | None = None):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  head = (sa.CausalMask((t, t)) if window is None
          else sa.LocalMask((t, t), window_size=(window - 1, 0), offset=0))
  mask = sa.MultiHeadMask([head] * groups)
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  # Built per trace, not cached: its block-sparsity tables become constants of this trace.
  return sa.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash(q_btnh, k_btkh, v_btkh, seg_bt, *, scale, interpret, window=None):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  b, t, n, h = q_btnh.shape
  kv = k_btkh.shape[2]
  block = _block_size(t, 512)
  q_btnh, k_btkh, v_btkh, seg_bt = _pad_tokens(block, q_btnh, k_btkh, v_btkh, seg_bt)
  tp = q_btnh.shape[1]
  kernel = _splash_kernel(tp, n // kv, block, interpret, window)
  # (B, T, N, H) -> (B, K, G, T, H): one MQA kernel call per KV head and its query group.
  q_bkgth = (q_btnh * jnp.asarray(scale, q_btnh.dtype)).reshape(
      b, tp, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
  k_bkth = k_btkh.transpose(0, 2, 1, 3)
  v_bkth = v_btkh.transpose(0, 2, 1, 3)
  seg = sa.SegmentIds(q=seg_bt.astype(jnp.int32), kv=seg_bt.astype(jnp.int32))
  per_head = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s),
                      in_axes=(0, 0, 0, None))
  out_bkgth = jax.vmap(per_head)(q_bkgth, k_bkth, v_bkth, seg)
  out_btnh = out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, h)
  return out_btnh[:, :t].astype(q_btnh.dtype)


def _pallas_gpu(q_btnh, k_btkh, v_btkh, seg_bt, *, scale, interpret):
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention

  t, n = q_btnh.shape[1], q_btnh.shape[2]
  groups = n // k_btkh.shape[2]
  block = _block_size(t, 128)
  q_btnh, k_btkh, v_btkh, seg_bt = _pad_tokens(block, q_btnh, k_btkh, v_btkh, seg_bt)
  k_btnh = jnp.repeat(k_btkh, groups, axis=2)  # query head i reads KV head i // groups
  v_btnh = jnp.repeat(v_btkh, groups, axis=2)
  sizes = gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=block,
                                   block_kv_dkv=block, block_q_dq=block, block_kv_dq=block)
  out_btnh = gpu_attention.mha(q_btnh, k_btnh, v_btnh, seg_bt.astype(jnp.int32),
                               sm_scale=scale, causal=True, block_sizes=sizes,
                               interpret=interpret)
  return out_btnh[:, :t]
