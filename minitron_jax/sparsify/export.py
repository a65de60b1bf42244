"""Sparse checkpoints: dense HF weights, or compressed-tensors `sparse-24-bitmask`.

`sparse-24-bitmask` (compressed-tensors' `Sparse24BitMaskConfig`, the 2:4 format vLLM's
CUTLASS sparse kernels were fed from) stores each 2:4 linear weight `[out, in]` as

  `{module}.compressed`  `(out, in / 2)` the two kept values of every group of 4, row-major;
  `{module}.bitmask`     `(out, ceil(in / 8))` uint8, bit `j % 8` of byte `j // 8` (little
                         bit order, `numpy.packbits(..., bitorder="little")`) set where input
                         `j` is kept: exactly two per group;
  `{module}.shape`       `(2, 1)` int64, the dense shape;

and the config names it in `quantization_config.sparsity_config`. With FP8 or INT8 the kept
values are the per-channel codes (`float-quantized` / `int-quantized`: 8-bit weights, dynamic
per-token 8-bit activations, the only 2:4 schemes those kernels ran), with
`{module}.weight_scale` `(out, 1)`. Embeddings, norms and the LM head stay dense.

The kept values are exactly our params' (or their codes'), so a consumer that decompresses the
bitmask computes what our forward computes.
"""

from __future__ import annotations

import json
import os

import numpy as np

from minitron_jax import axes
from minitron_jax.config import LlamaConfig
from minitron_jax.io import hf as hf_io
from minitron_jax.io.safetensors import write
from minitron_jax.quantize import export as quant_export
from minitron_jax.quantize import formats as Q
from minitron_jax.sparsify import apply
from minitron_jax.sparsify import methods
from minitron_jax.sparsify.methods import Pattern

# --export name -> the weight format of its kept values (None: the dense dtype).
EXPORT_FORMATS: dict[str, Q.QuantFormat | None] = {
    "dense": None,
    "sparse24": None,
    "sparse24_fp8": Q.QuantFormat.FP8_CHANNEL,
    "sparse24_int8": Q.QuantFormat.INT8_CHANNEL,
}
SPARSE24 = Pattern(2, 4, 0.5)
BITMASK_FORMAT = "sparse-24-bitmask"


def check_export(name: str, pattern: Pattern) -> None:
  """Raises ValueError unless export `name` can store `pattern`."""
  if name not in EXPORT_FORMATS:
    raise ValueError(f"unknown sparse export {name!r}; known: {', '.join(EXPORT_FORMATS)}")
  if name != "dense" and (pattern.n, pattern.m) != (2, 4):
    raise ValueError(f"{name} stores 2:4 sparsity only, not {pattern.name}; export it dense")


def bitmask_compress(values_oi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(compressed `(out, in / 2)`, packed bitmask `(out, ceil(in / 8))` uint8) of a 2:4 matrix.

  The bitmask keeps the two largest `|value|` of each group of 4 (the first on ties), which
  covers every non-zero of a 2:4 matrix; ValueError if a group has more than two.
  """
  v = np.asarray(values_oi)
  methods.check_pattern(v, SPARSE24)
  keep = methods.nm_keep(np.abs(v.astype(np.float32)), 2, 4)
  out, inp = v.shape
  return v[keep].reshape(out, inp // 2), np.packbits(keep, axis=-1, bitorder="little")


def _lazy(name, shape, dtype, fn):
  return name, tuple(shape), np.dtype(dtype), lambda: np.asarray(fn())


def _sparse_tensors(module: str, matrix, dtype, scale, out: int, inp: int) -> list:
  """compressed / bitmask / shape (+ weight_scale) of one module; `matrix()` gives its
  `[out, in]` stored values, computed once when the writer reaches them."""
  cache = {}

  def part(key: str):  # both halves from one compression; dropped once written
    if key not in cache:
      cache["c"], cache["b"] = bitmask_compress(matrix())
    return cache.pop(key)

  tensors = [_lazy(f"{module}.compressed", (out, inp // 2), dtype, lambda: part("c")),
             _lazy(f"{module}.bitmask", (out, -(-inp // 8)), np.uint8, lambda: part("b")),
             _lazy(f"{module}.shape", (2, 1), np.int64,
                   lambda: np.array([[out], [inp]], np.int64))]
  if scale is not None:
    tensors.append(_lazy(f"{module}.weight_scale", (out, 1), np.float32, scale))
  return tensors


def sparse24_tensors(params: dict, cfg: LlamaConfig) -> list:
  """Every tensor of a `sparse-24-bitmask` checkpoint of `params` (float leaves, or
  `QuantizedArray`s of FP8 / INT8 per channel for the linear weights)."""
  names = set(apply.sparse_specs(cfg))
  tensors = []
  for spec, i in quant_export._hf_order(cfg):
    hf_name = spec.hf_name.format(i=i) if i is not None else spec.hf_name
    leaf = axes.get(params, spec)
    if spec.path[-1] not in names or not spec.stacked:
      tensors.append(quant_export._dense(hf_name, spec, cfg, leaf, i))
      continue
    module = hf_name.removesuffix(".weight")
    out, inp = axes.hf_shape(spec, cfg)
    if Q.is_quantized(leaf):
      matrix = (lambda q=leaf, i=i: np.asarray(q.values[i]))
      scale = (lambda q=leaf, i=i: np.asarray(q.scale[i], np.float32).reshape(-1, 1))
      dtype = leaf.values.dtype
    else:
      matrix = (lambda x=leaf, s=spec, i=i: axes.to_hf_layout(np.asarray(x[i]), s))
      scale, dtype = None, leaf.dtype
    tensors += _sparse_tensors(module, matrix, dtype, scale, out, inp)
  return tensors


def sparse24_config(fmt: Q.QuantFormat | None, sparsity: float) -> dict:
  """`quantization_config` of a `sparse-24-bitmask` checkpoint (FP8 / INT8 W8A8 or none)."""
  # The fields of compressed-tensors' `Sparse24BitMaskConfig` (the tests validate it there;
  # the run-time code does not import compressed-tensors, which needs torch).
  sparse = {"format": BITMASK_FORMAT, "targets": ["Linear"], "ignore": ["lm_head"],
            "global_sparsity": round(sparsity, 6), "sparsity_structure": "2:4"}
  out = {"quant_method": "compressed-tensors", "quantization_status": "compressed",
         "sparsity_config": sparse, "kv_cache_scheme": None, "ignore": ["lm_head"],
         "config_groups": {}, "format": "dense"}
  if fmt is not None:
    kind = "float" if fmt.kind == "fp8" else "int"
    out["format"] = f"{kind}-quantized"
    args = {"num_bits": 8, "type": kind, "symmetric": True, "group_size": None}
    out["config_groups"] = {"group_0": {
        "targets": ["Linear"], "format": out["format"],
        "weights": {**args, "strategy": "channel", "dynamic": False, "observer": "minmax"},
        "input_activations": {**args, "strategy": "token", "dynamic": True, "observer": None},
        "output_activations": None}}
  return out


def stored_params(params: dict, cfg: LlamaConfig, name: str, dense_dtype: str = "bfloat16"
                  ) -> dict:
  """Sparse float `params` exactly as export `name` stores them: float leaves in
  `dense_dtype`, the linear weights quantized for the FP8 / INT8 variants."""
  fmt = EXPORT_FORMATS[name]
  return Q.cast_unquantized(params if fmt is None else Q.quantize_params(params, cfg, fmt),
                            quant_export.DENSE_DTYPES[dense_dtype])


def write_export(stored: dict, cfg: LlamaConfig, name: str, pattern: Pattern, out_dir: str,
                 source_dir: str | None, *, sparsity: float, overwrite: bool = False,
                 extra_files=None) -> None:
  """Writes export `name` of `stored_params` into `out_dir` (atomically).

  Args:
    stored: from `stored_params`.
    cfg: its config.
    name: a key of `EXPORT_FORMATS`.
    pattern: the params' sparsity pattern (2:4 for the sparse-24 exports).
    out_dir: output directory.
    source_dir: tokenizer files and generation config come from here.
    sparsity: zero fraction of the linear weights (recorded in the config).
    overwrite: replace a non-empty `out_dir`.
    extra_files: called with the temporary directory before it is published.
  """
  check_export(name, pattern)
  if name == "dense":
    hf_io.save_hf(stored, cfg, out_dir, source_dir=source_dir, overwrite=overwrite,
                  extra_files=extra_files)
    return
  dense = {np.dtype(x.dtype) for _, x in axes.iter_leaves(stored, cfg) if not Q.is_quantized(x)}
  with hf_io.atomic_output_dir(out_dir, overwrite) as tmp:
    write(os.path.join(tmp, hf_io.SINGLE_FILE), sparse24_tensors(stored, cfg),
          metadata={"format": "pt"})
    hf_cfg = cfg.to_hf(torch_dtype=hf_io.torch_dtype_name(dense))
    hf_cfg["quantization_config"] = sparse24_config(EXPORT_FORMATS[name], sparsity)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=2)
    quant_export.copy_aux_files(source_dir, tmp, cfg)
    if extra_files is not None:
      extra_files(tmp)
