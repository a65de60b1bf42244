"""Weight quantization as a params -> params function, chosen by `QuantFormat`.

Every quantized leaf is a `QuantizedArray`: a pytree whose arrays keep the leaf's leading
`layers` axis (so `jax.lax.scan` slices them like any other leaf) and whose `dequantize(dtype)`
rebuilds the weight in our layout inside the jitted forward (see `model.weight`).

Values are stored as the matrix every consumer uses, HF's `[out, in]` (one per layer): the
input-feature axes are the reduction axes of each einsum, and they are read from the HF layout
of `axes.PARAM_SPECS` (`hf_axes[-1]`), never from hard-coded positions. Scales cover blocks of
`(block_out, block_in)` elements of that matrix:

  per-tensor (out, in) | per-channel (1, in) | block (128, 128) | group (1, 128)

and a block that does not divide its dimension is cut short at the edge (FP8 block format),
except for the INT4 group formats, whose group falls back to `gcd(in, group_size)` because
packed-int4 consumers need whole groups. INT4 values are two per byte (element `2j` in the low
nibble, `2j+1` in the high one, offset by 8), so memory falls with the format.

The GGUF formats quantize with `gguf.quants` itself (llama.cpp's exact rounding and float16
block scales), so JAX inference on them runs exactly the weights llama.cpp runs.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any, Iterable, Mapping

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax import axes
from minitron_jax.config import LlamaConfig

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_BLOCK = 128
DEFAULT_GROUP_SIZE = 128
GGUF_BLOCK = 32


class QuantFormat(enum.Enum):
  """Weight formats. Values are the names used on the command line and in reports."""

  FP8_TENSOR = "fp8_tensor"          # float8_e4m3fn, one scale per tensor
  FP8_CHANNEL = "fp8_channel"        # one scale per output channel
  FP8_BLOCK = "fp8_block"            # one scale per 128x128 block (transformers' fine-grained)
  INT8_CHANNEL = "int8_channel"      # symmetric [-127, 127], one scale per output channel
  INT4_GROUP = "int4_group"          # symmetric [-8, 7], one scale per 128 inputs
  INT4_GROUP_ASYM = "int4_group_asym"  # [0, 15] with a zero point per group of 128 inputs
  GGUF_Q8_0 = "gguf_q8_0"            # llama.cpp Q8_0: int8, float16 scale per 32 inputs
  GGUF_Q4_0 = "gguf_q4_0"            # llama.cpp Q4_0: int4, float16 scale per 32 inputs

  @property
  def kind(self) -> str:
    """Storage kind: 'fp8', 'int8' or 'int4'."""
    if self.value.startswith("fp8"):
      return "fp8"
    return "int8" if self in (QuantFormat.INT8_CHANNEL, QuantFormat.GGUF_Q8_0) else "int4"

  @property
  def is_gguf(self) -> bool:
    return self.value.startswith("gguf")

  @property
  def asymmetric(self) -> bool:
    return self is QuantFormat.INT4_GROUP_ASYM


def parse_format(name: str | QuantFormat) -> QuantFormat:
  if isinstance(name, QuantFormat):
    return name
  try:
    return QuantFormat(name)
  except ValueError:
    known = ", ".join(f.value for f in QuantFormat)
    raise ValueError(f"unknown quantization format {name!r}; known: {known}") from None


# ---------------------------------------------------------------------------- the leaf


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """A quantized weight: per-layer `[out, in]` values, block scales, optional zero points.

  Attributes:
    values: `(..., out, in)` float8_e4m3fn or int8, or `(..., out, in // 2)` uint8 holding
      two offset-by-8 int4 nibbles per byte.
    scale: `(..., ceil(out / block_out), ceil(in / block_in))`; value = stored * scale.
    zero_point: int4 asymmetric only, `(..., out, in / block_in)` uint8 in [0, 15]
      (value = (nibble - zero_point) * scale); None otherwise (int4 symmetric uses 8).
    input_scale: optional static FP8 activation scale per layer, `(...)` float32.
    fmt: the `QuantFormat` value.
    block: `(block_out, block_in)`.
    out_dims, in_dims: sizes of the logical axes merged into `out` and `in`.
    perm: transpose from `(*out_dims, *in_dims)` to our layout of one layer.
  """

  values: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  input_scale: jax.Array | None
  fmt: str
  block: tuple[int, int]
  out_dims: tuple[int, ...]
  in_dims: tuple[int, ...]
  perm: tuple[int, ...]

  @property
  def format(self) -> QuantFormat:
    return QuantFormat(self.fmt)

  @property
  def matrix_shape(self) -> tuple[int, int]:
    return math.prod(self.out_dims), math.prod(self.in_dims)

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the dequantized leaf in our layout."""
    lead = self.values.shape[:-2]
    logical = (*self.out_dims, *self.in_dims)
    return (*lead, *(logical[p] for p in self.perm))

  @property
  def nbytes(self) -> int:
    return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(self))

  def int_values(self) -> jax.Array:
    """Stored integers (`(..., out, in)` int8; int4 as unsigned nibbles 0..15); fp8 as is."""
    if self.format.kind != "int4":
      return self.values
    return unpack_int4(self.values, self.matrix_shape[1])

  def matrix(self, dtype=jnp.float32) -> jax.Array:
    """Dequantized `(..., out, in)` matrix (HF layout)."""
    q = self.int_values().astype(jnp.float32)
    if self.format.kind == "int4":
      if self.zero_point is None:
        q = q - 8.0
      else:
        q = blockwise(q, self.zero_point.astype(jnp.float32), (1, self.block[1]), jnp.subtract)
    return blockwise(q, self.scale.astype(jnp.float32), self.block, jnp.multiply).astype(dtype)

  def dequantize(self, dtype) -> jax.Array:
    """The weight in our layout, `dtype`; leading (layer) axes are kept."""
    w = self.matrix(jnp.float32)
    lead = w.ndim - 2
    w = w.reshape(*w.shape[:lead], *self.out_dims, *self.in_dims)
    w = w.transpose(*range(lead), *(lead + p for p in self.perm))
    return w.astype(dtype)

  def quantize_input(self, x: jax.Array) -> jax.Array:
    """The layer's input as a static-FP8 (W8A8) consumer computes it: `x / input_scale` cast
    (saturating) to float8_e4m3fn and scaled back; `x` itself without an `input_scale`."""
    if self.input_scale is None:
      return x
    s = self.input_scale.astype(jnp.float32)
    return (to_fp8(x.astype(jnp.float32) / s).astype(jnp.float32) * s).astype(x.dtype)

  def take_rows(self, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` of a `[out, in]`-laid leaf (the embedding), dequantizing only those rows."""
    if self.values.ndim != 2 or self.perm != (0, 1):
      raise ValueError("take_rows needs an unstacked leaf laid out as [rows, features]")
    _, inp = self.matrix_shape
    bo, bi = self.block
    q = jnp.take(self.int_values(), ids, axis=0).astype(jnp.float32)
    scale = expand_blocks(jnp.take(self.scale, ids // bo, axis=0).astype(jnp.float32),
                          (1, bi), None, inp)
    if self.format.kind == "int4":
      zp = 8.0 if self.zero_point is None else expand_blocks(
          jnp.take(self.zero_point, ids, axis=0).astype(jnp.float32), (1, bi), None, inp)
      q = q - zp
    return (q * scale).astype(dtype)


jax.tree_util.register_dataclass(
    QuantizedArray, data_fields=["values", "scale", "zero_point", "input_scale"],
    meta_fields=["fmt", "block", "out_dims", "in_dims", "perm"])


def is_quantized(leaf: Any) -> bool:
  return isinstance(leaf, QuantizedArray)


# ---------------------------------------------------------------------------- array math


def blockwise(x: jax.Array, s: jax.Array, block: tuple[int, int], op) -> jax.Array:
  """`op(x, s)` with `s` holding one value per `(block_out, block_in)` block of `x`.

  Whole blocks broadcast through a reshape (nothing repeated in memory); a partial edge
  block falls back to repeating `s`.
  """
  bo, bi = block
  out, inp = x.shape[-2:]
  if out % bo or inp % bi:
    return op(x, expand_blocks(s, block, out, inp))
  lead = x.shape[:-2]
  xb = x.reshape(*lead, out // bo, bo, inp // bi, bi)
  return op(xb, s[..., :, None, :, None]).reshape(x.shape)


def expand_blocks(s: jax.Array, block: tuple[int, int], rows: int | None, cols: int
                  ) -> jax.Array:
  """Repeats per-block values over their `(block_out, block_in)` elements, cut to the matrix.

  `rows=None` leaves the row axis as is (rows already gathered one per element).
  """
  bo, bi = block
  if rows is not None and bo > 1:
    s = jnp.repeat(s, bo, axis=-2, total_repeat_length=s.shape[-2] * bo)[..., :rows, :]
  if bi > 1:
    s = jnp.repeat(s, bi, axis=-1, total_repeat_length=s.shape[-1] * bi)[..., :cols]
  return s


def _block_reduce(m: jax.Array, block: tuple[int, int], fn) -> jax.Array:
  """`fn` over each `(block_out, block_in)` block of `(..., out, in)`; edge blocks padded with
  the edge value so they reduce over real elements only."""
  bo, bi = block
  out, inp = m.shape[-2:]
  pad = [(0, 0)] * (m.ndim - 2) + [(0, -out % bo), (0, -inp % bi)]
  m = jnp.pad(m, pad, mode="edge")
  lead = m.shape[:-2]
  m = m.reshape(*lead, m.shape[-2] // bo, bo, m.shape[-1] // bi, bi)
  return fn(m, axis=(-3, -1))


def pack_int4(nibbles: jax.Array) -> jax.Array:
  """`(..., n)` values in [0, 15] -> `(..., n / 2)` uint8; element 2j in the low nibble."""
  if nibbles.shape[-1] % 2:
    raise ValueError(f"int4 packing needs an even last dimension, got {nibbles.shape[-1]}")
  u = nibbles.astype(jnp.uint8).reshape(*nibbles.shape[:-1], -1, 2)
  return u[..., 0] | (u[..., 1] << 4)


def unpack_int4(packed: jax.Array, n: int) -> jax.Array:
  """Inverts `pack_int4`: `(..., n / 2)` uint8 -> `(..., n)` uint8 in [0, 15]."""
  lo, hi = packed & 0xF, packed >> 4
  return jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], n)


def to_fp8(x: jax.Array) -> jax.Array:
  """Saturating cast to float8_e4m3fn (a plain cast turns out-of-range values into NaN)."""
  return jnp.clip(jnp.asarray(x, jnp.float32), -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)


def _safe(scale: jax.Array) -> jax.Array:
  # An all-zero block has nothing to scale; 1 keeps the division finite and exact.
  return jnp.where(scale > 0, scale, 1.0).astype(jnp.float32)


def quantize_matrix(m: jax.Array, fmt: QuantFormat, block: tuple[int, int]):
  """Quantizes `(..., out, in)` float32 with `block` scales.

  Returns:
    (values, scale, zero_point or None) as stored in `QuantizedArray`.
  """
  m = jnp.asarray(m, jnp.float32)
  if fmt.asymmetric:
    lo = jnp.minimum(_block_reduce(m, block, jnp.min), 0.0)
    hi = jnp.maximum(_block_reduce(m, block, jnp.max), 0.0)
    scale = _safe((hi - lo) / 15.0)
    zp = jnp.clip(jnp.round(-lo / scale), 0, 15).astype(jnp.uint8)
    return encode_matrix(m, fmt, block, scale, zp), scale, zp
  amax = _block_reduce(jnp.abs(m), block, jnp.max)
  qmax = {"fp8": FP8_MAX, "int8": 127.0, "int4": 7.5}[fmt.kind]
  scale = _safe(amax / qmax)
  return encode_matrix(m, fmt, block, scale), scale, None


def encode_matrix(m: jax.Array, fmt: QuantFormat, block: tuple[int, int], scale: jax.Array,
                  zero_point: jax.Array | None = None) -> jax.Array:
  """Stored values of `(..., out, in)` float32 `m` on a given grid (`block` scales, and the
  zero points of int4 asymmetric): each weight rounded to the nearest grid point."""
  out, inp = m.shape[-2:]
  x = jnp.asarray(m, jnp.float32) / expand_blocks(scale, block, out, inp)
  if fmt.asymmetric:
    zp = expand_blocks(zero_point.astype(jnp.float32), block, out, inp)
    return pack_int4(jnp.clip(jnp.round(x) + zp, 0, 15))
  if fmt.kind == "fp8":
    return to_fp8(x)
  if fmt.kind == "int8":
    return jnp.clip(jnp.round(x), -127, 127).astype(jnp.int8)
  return pack_int4(jnp.clip(jnp.round(x), -8, 7) + 8)


def requantize_leaf(x: jax.Array, spec: axes.ParamSpec, q: QuantizedArray) -> QuantizedArray:
  """`x` (a leaf of `spec`) encoded on the grid of `q`: its scales and zero points kept."""
  if q.format.is_gguf:
    raise ValueError(f"{spec.name}: {q.fmt} grids are encoded on the host by llama.cpp's code")
  return dataclasses.replace(q, values=encode_matrix(to_matrix(x, spec), q.format, q.block,
                                                     q.scale, q.zero_point))


def quantize_matrix_gguf(m: np.ndarray, fmt: QuantFormat):
  """Q8_0 / Q4_0 through `gguf.quants` (llama.cpp's rounding), decoded to our storage.

  Returns:
    (values, float16 scale per 32 inputs, None).
  """
  m = np.asarray(m, np.float32)
  if m.shape[-1] % GGUF_BLOCK:
    raise ValueError(f"GGUF {fmt.value} needs rows that are multiples of {GGUF_BLOCK}, "
                     f"got {m.shape[-1]}")
  qtype = gguf.GGMLQuantizationType.Q8_0 if fmt.kind == "int8" else \
      gguf.GGMLQuantizationType.Q4_0
  raw = gguf.quants.quantize(m.reshape(-1, m.shape[-1]), qtype)
  blocks = raw.reshape(-1, raw.shape[-1] // (m.shape[-1] // GGUF_BLOCK))  # one row per block
  scale = blocks[:, :2].copy().view(np.float16).reshape(*m.shape[:-1], -1)
  body = blocks[:, 2:]
  if fmt.kind == "int8":
    values = body.copy().view(np.int8).reshape(m.shape)
  else:  # Q4_0: low nibbles hold elements 0..15 of a block, high nibbles 16..31
    nibbles = np.concatenate([body & 0xF, body >> 4], axis=-1).reshape(m.shape)
    values = np.asarray(pack_int4(nibbles))
  return jnp.asarray(values), jnp.asarray(scale), None


# ---------------------------------------------------------------------------- params


def split_axes(spec: axes.ParamSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(output axes, input axes) of a linear leaf, from its HF `[out, in]` layout."""
  if len(spec.hf_axes) != 2:
    raise ValueError(f"{spec.name} is not a matrix")
  return spec.hf_axes[0], spec.hf_axes[1]


def is_quantizable(spec: axes.ParamSpec, include_embeddings: bool = False) -> bool:
  """Linear layers always; the embedding and LM head only when asked; norms never."""
  if len(spec.hf_axes) != 2:
    return False
  return include_embeddings or axes.VOCAB not in spec.axes


def block_shape(fmt: QuantFormat, out: int, inp: int, group_size: int = DEFAULT_GROUP_SIZE
                ) -> tuple[int, int]:
  """Scale block of `fmt` for an `[out, inp]` matrix."""
  if fmt is QuantFormat.FP8_TENSOR:
    return out, inp
  if fmt in (QuantFormat.FP8_CHANNEL, QuantFormat.INT8_CHANNEL):
    return 1, inp
  if fmt is QuantFormat.FP8_BLOCK:
    return min(FP8_BLOCK, out), min(FP8_BLOCK, inp)
  if fmt.is_gguf:
    return 1, GGUF_BLOCK
  g = math.gcd(inp, group_size)
  if g % 2:
    raise ValueError(f"int4 groups need an even input size, got {inp}")
  return 1, g


def to_matrix(x: jax.Array, spec: axes.ParamSpec) -> jax.Array:
  """Our leaf (layers leading when stacked) -> `(..., out, in)` with HF row/column order."""
  lead = 1 if spec.stacked else 0
  own = spec.axes[lead:]
  out_axes, in_axes = split_axes(spec)
  order = [own.index(a) for a in (*out_axes, *in_axes)]
  x = jnp.asarray(x).transpose(*range(lead), *(lead + o for o in order))
  n_out = math.prod(x.shape[lead:lead + len(out_axes)])
  return x.reshape(*x.shape[:lead], n_out, -1)


def matrix_layout(spec: axes.ParamSpec, shape: tuple[int, ...]
                  ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(out_dims, in_dims, perm) of a `QuantizedArray` for a leaf of `spec` and `shape`."""
  lead = 1 if spec.stacked else 0
  own = spec.axes[lead:]
  out_axes, in_axes = split_axes(spec)
  sizes = dict(zip(own, shape[lead:]))
  flat = (*out_axes, *in_axes)
  return (tuple(sizes[a] for a in out_axes), tuple(sizes[a] for a in in_axes),
          tuple(flat.index(a) for a in own))


def quantize_leaf(x: jax.Array, spec: axes.ParamSpec, fmt: QuantFormat,
                  group_size: int = DEFAULT_GROUP_SIZE,
                  input_scale: jax.Array | None = None) -> QuantizedArray:
  """Quantizes one parameter leaf of `spec`."""
  out_dims, in_dims, perm = matrix_layout(spec, x.shape)
  m = to_matrix(x, spec)
  block = block_shape(fmt, m.shape[-2], m.shape[-1], group_size)
  if fmt.is_gguf:
    values, scale, zp = quantize_matrix_gguf(np.asarray(m), fmt)
  else:
    values, scale, zp = _jit_quantize_matrix(m, fmt, block)
  if input_scale is not None:
    input_scale = jnp.asarray(input_scale, jnp.float32)
  return QuantizedArray(values, scale, zp, input_scale, fmt.value, block, out_dims, in_dims,
                        perm)


_jit_quantize_matrix = jax.jit(quantize_matrix, static_argnums=(1, 2))

# Which tap feeds each linear layer (for static activation scales).
INPUT_TAPS = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_heads",
              "gate": "mlp_in", "up": "mlp_in", "down": "mlp_act"}


def quantize_params(params: dict, cfg: LlamaConfig, fmt: QuantFormat | str, *,
                    include_embeddings: bool = False, group_size: int = DEFAULT_GROUP_SIZE,
                    activation_scales: Mapping[str, jax.Array] | None = None) -> dict:
  """Quantizes every linear weight of `params`.

  Args:
    params: float param tree.
    cfg: its config.
    fmt: a `QuantFormat` (or its value).
    include_embeddings: also quantize the embedding (and an untied LM head).
    group_size: inputs per scale for the INT4 group formats (falls back to
      `gcd(in, group_size)` where it does not divide the input size).
    activation_scales: tap name -> per-layer static FP8 input scale (see
      `calibrate_activation_scales`); attached to the FP8 leaves they feed.

  Returns:
    A param tree of the same structure: quantized leaves are `QuantizedArray`s, the rest are
    the original arrays.
  """
  fmt = parse_format(fmt)
  if group_size < 2:
    raise ValueError(f"group_size must be >= 2, got {group_size}")
  if activation_scales and fmt.kind != "fp8":
    raise ValueError("static activation scales are FP8 only")
  items = []
  for spec, leaf in axes.iter_leaves(params, cfg):
    if is_quantized(leaf):
      raise ValueError(f"{spec.name} is already quantized")
    if not is_quantizable(spec, include_embeddings):
      items.append((spec, leaf))
      continue
    tap = INPUT_TAPS.get(spec.path[-1]) if spec.stacked else None
    act = activation_scales.get(tap) if activation_scales and tap else None
    items.append((spec, quantize_leaf(leaf, spec, fmt, group_size, act)))
  return axes.tree_from_leaves(items)


def cast_unquantized(params: dict, dtype) -> dict:
  """Casts the leaves left in high precision (norms, embeddings) to `dtype`."""
  return jax.tree_util.tree_map(lambda x: x if is_quantized(x) else jnp.asarray(x).astype(dtype),
                                params, is_leaf=is_quantized)


@dataclasses.dataclass(frozen=True)
class QuantizedBase:
  """The student setup of QLoRA (`distill.run.run(job, student_setup=...)`): the frozen base
  with its linear weights quantized to `fmt` (the adapters then train on it).

  Attributes:
    fmt: an export name of a weight-only INT format (`FORMATS`).
    group_size: INT4 group size.
  """

  FORMATS = {"int8": QuantFormat.INT8_CHANNEL, "int4": QuantFormat.INT4_GROUP,
             "int4_asym": QuantFormat.INT4_GROUP_ASYM}

  fmt: str
  group_size: int = DEFAULT_GROUP_SIZE

  def __call__(self, params: dict, cfg: LlamaConfig, tok) -> tuple[dict, None]:
    del tok
    if self.fmt not in self.FORMATS:
      raise ValueError(f"QLoRA base format {self.fmt!r} is not one of {tuple(self.FORMATS)}")
    return quantize_params(params, cfg, self.FORMATS[self.fmt], group_size=self.group_size), None


def param_bytes(params: dict) -> int:
  """Bytes held by the param pytree (values, scales and zero points included)."""
  return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(params))


# ---------------------------------------------------------------------------- calibration


def calibrate_activation_scales(params: dict, cfg: LlamaConfig,
                                batches: Iterable[np.ndarray], mesh=None
                                ) -> dict[str, jax.Array]:
  """Static FP8 input scales: amax of each linear layer's input over `batches`, / 448.

  Args:
    params: float (or weight-quantized) params.
    cfg: config.
    batches: int token arrays `(B, T)`.
    mesh: a `jax.sharding.Mesh`: params sharded by the logical-axis rules, each batch's
      rows split over the batch axes (padded with copies of its first row, which leave a
      maximum unchanged); the scales come back replicated.

  Returns:
    tap name (`attn_in`, `attn_heads`, `mlp_in`, `mlp_act`) -> `(L,)` float32 scales.
  """
  from minitron_jax import sharding

  names = sorted(set(INPUT_TAPS.values()))
  step = _amax_step(cfg, tuple(names), mesh)
  if mesh is not None:
    params = sharding.shard_params(params, cfg, mesh)
  amax = None
  for tokens in batches:
    tokens = np.asarray(tokens, np.int32)
    if mesh is not None:
      pad = sharding.padded_rows(len(tokens), mesh) - len(tokens)
      tokens = sharding.shard_rows(np.concatenate([tokens] + [tokens[:1]] * pad), mesh)
    if amax is None:  # |x| >= 0, so zeros are the identity of the running max
      amax = {n: np.zeros((cfg.num_hidden_layers,), np.float32) for n in names}
      if mesh is not None:
        amax = sharding.put_global(amax, {n: sharding.replicated(mesh) for n in names})
    amax = step(params, tokens, amax)
  if amax is None:
    raise ValueError("calibration needs at least one batch")
  return {n: _safe(amax[n] / FP8_MAX) for n in names}


@functools.lru_cache(maxsize=None)
def _amax_step(cfg: LlamaConfig, names: tuple[str, ...], mesh=None):
  """Jitted (params, tokens, amax) -> running per-layer amax of each tap (amax donated); one
  per config, so repeated calibrations reuse the compiled forward."""
  from minitron_jax import model as M

  amax_fn = lambda x: jnp.max(jnp.abs(x.astype(jnp.float32)))  # noqa: E731

  def step(params, tokens_bt, amax):
    got = M.forward(params, cfg, tokens_bt, taps={n: amax_fn for n in names})["taps"]
    return {n: jnp.maximum(amax[n], got[n]) for n in names}

  from minitron_jax import sharding
  return sharding.jit_on(step, mesh, donate_argnums=(2,))


# ---------------------------------------------------------------------------- errors


def error_stats(original: dict, quantized: dict, cfg: LlamaConfig) -> dict[str, dict]:
  """Per quantized HF tensor: relative RMS error, max abs error, stored and float32 bytes."""
  out = {}
  for spec, leaf in axes.iter_leaves(quantized, cfg):
    if not is_quantized(leaf):
      continue
    ref = to_matrix(axes.get(original, spec), spec).astype(jnp.float32)
    err = leaf.matrix(jnp.float32) - ref
    rel = jnp.sqrt(jnp.sum(err * err, (-2, -1)) / jnp.maximum(jnp.sum(ref * ref, (-2, -1)),
                                                               1e-30))
    mx = jnp.max(jnp.abs(err), (-2, -1))
    n = ref.shape[0] if spec.stacked else 1
    per_layer = leaf.nbytes // n
    for i in range(n):
      name = spec.hf_name.format(i=i) if spec.stacked else spec.hf_name
      r, m = (rel[i], mx[i]) if spec.stacked else (rel, mx)
      out[name] = {"rel_rms_error": float(r), "max_abs_error": float(m), "bytes": per_layer,
                   "float32_bytes": int(ref.size // n * 4)}
  return out


def check_dims(cfg: LlamaConfig, fmt: QuantFormat | str, group_size: int = DEFAULT_GROUP_SIZE,
               include_embeddings: bool = False) -> None:
  """Raises ValueError, before any weight is read, if `fmt` cannot store the model's matrices."""
  fmt = parse_format(fmt)
  for spec in axes.param_specs(cfg):
    if not is_quantizable(spec, include_embeddings):
      continue
    _, inp = axes.hf_shape(spec, cfg)
    if fmt.is_gguf and inp % GGUF_BLOCK:
      raise ValueError(f"{fmt.value}: {spec.hf_name} has {inp} inputs, not a multiple of "
                       f"{GGUF_BLOCK}")
    if fmt.kind == "int4" and math.gcd(inp, group_size) % 8:
      raise ValueError(f"{fmt.value}: {spec.hf_name} has {inp} inputs; int4 groups (gcd with "
                       f"group_size {group_size}) must be multiples of 8")
