"""Quantized checkpoints that other stacks load, plus the one-call quantize-and-export pipeline.

Formats (`EXPORT_FORMATS`):

  fp8          transformers' fine-grained FP8: float8_e4m3fn `weight`, one float32
               `weight_scale_inv` per 128x128 block (vLLM, SGLang, TensorRT-LLM read it too).
  fp8_channel  compressed-tensors `naive-quantized`: FP8 `weight`, one `weight_scale` per
  fp8_tensor   output channel / per tensor (weight-only FP8).
  int8         compressed-tensors `pack-quantized`: 4 int8 per int32 `weight_packed`, one
               `weight_scale` per output channel, `weight_shape` (vLLM's W8A16 layout).
  int4         compressed-tensors `pack-quantized`: 8 int4 per int32 `weight_packed`, one
  int4_asym    scale (and packed zero point) per group of 128 inputs (W4A16).
  gguf_q8_0    one llama.cpp GGUF file (see `gguf_export`).
  gguf_q4_0

The exported tensors are exactly the quantized params (`quantize.QuantizedArray`), so a
consumer's dequantized weights equal what our JAX forward runs on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax import axes, model as M
from minitron_jax.io import hf as hf_io
from minitron_jax.quantize import formats as Q
from minitron_jax.config import LlamaConfig
from minitron_jax.io.safetensors import write

EXPORT_FORMATS: dict[str, Q.QuantFormat] = {
    "fp8": Q.QuantFormat.FP8_BLOCK,
    "fp8_channel": Q.QuantFormat.FP8_CHANNEL,
    "fp8_tensor": Q.QuantFormat.FP8_TENSOR,
    "int8": Q.QuantFormat.INT8_CHANNEL,
    "int4": Q.QuantFormat.INT4_GROUP,
    "int4_asym": Q.QuantFormat.INT4_GROUP_ASYM,
    "gguf_q8_0": Q.QuantFormat.GGUF_Q8_0,
    "gguf_q4_0": Q.QuantFormat.GGUF_Q4_0,
}
REPORT_FILE = "quantize_report.json"
DENSE_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}

Tensor = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def export_format(name: str) -> Q.QuantFormat:
  """The weight format of an export format name; ValueError for an unknown one."""
  if name not in EXPORT_FORMATS:
    raise ValueError(f"unknown export format {name!r}; known: {', '.join(EXPORT_FORMATS)}")
  return EXPORT_FORMATS[name]


# ---------------------------------------------------------------------------- tensors


def _at(x: Any, i: int | None) -> Any:
  """Layer `i` of a stacked array or `QuantizedArray` (the whole thing when `i` is None)."""
  return x if i is None else jax.tree_util.tree_map(lambda a: a[i], x)


def _lazy(name: str, shape, dtype, fn: Callable[[], Any]) -> Tensor:
  """A tensor produced (sliced, converted) only when the writer reaches it."""
  return name, tuple(shape), np.dtype(dtype), lambda: np.asarray(fn())


def _hf_order(cfg: LlamaConfig) -> list[tuple[axes.ParamSpec, int | None]]:
  """(spec, layer) in the order HF writes its tensors."""
  specs = axes.param_specs(cfg)
  tail = (("final_norm",), ("lm_head",))
  out = [(s, None) for s in specs if not s.stacked and s.path not in tail]
  out += [(s, i) for i in range(cfg.num_hidden_layers) for s in specs if s.stacked]
  return out + [(s, None) for s in specs if s.path in tail]


def _dense(name: str, spec: axes.ParamSpec, cfg: LlamaConfig, leaf, i) -> Tensor:
  return _lazy(name, axes.hf_shape(spec, cfg), leaf.dtype,
               lambda: axes.to_hf_layout(np.asarray(_at(leaf, i)), spec))


def fp8_tensors(module: str, q: Q.QuantizedArray, i: int | None) -> list[Tensor]:
  """transformers' fine-grained FP8: `weight` + `weight_scale_inv` (+ `activation_scale`)."""
  out = [_lazy(f"{module}.weight", q.matrix_shape, q.values.dtype, lambda: _at(q.values, i)),
         _lazy(f"{module}.weight_scale_inv", q.scale.shape[-2:], np.float32,
               lambda: _at(q.scale, i).astype(jnp.float32))]
  if q.input_scale is not None:
    out.append(_lazy(f"{module}.activation_scale", (), np.float32,
                     lambda: _at(q.input_scale, i).reshape(()).astype(jnp.float32)))
  return out


def pack_int32(data: np.ndarray, bits: int) -> np.ndarray:
  """Stored ints -> compressed-tensors' int32 words, `32 / bits` consecutive inputs per word.

  compressed-tensors puts input k of a word at bits `k * bits` with an offset of
  `2 ** (bits - 1)`; on little-endian words that is our storage byte order: int8 values
  + 128 one per byte, or our packed int4 bytes (low nibble first, already offset by 8).

  Args:
    data: int8 values `(rows, n)` for 8 bits, our packed int4 bytes `(rows, n / 2)` for 4.
    bits: 8 or 4.
  """
  b = (np.asarray(data, np.int8).astype(np.int16) + 128).astype(np.uint8) if bits == 8 \
      else np.asarray(data, np.uint8)
  b = np.ascontiguousarray(b)
  if b.shape[-1] % 4:
    raise ValueError(f"packed int{bits} export needs input sizes that are multiples of "
                     f"{32 // bits}")
  return b.view("<u4").view("<i4")


def _pack_zero_points(zp: np.ndarray) -> np.ndarray:
  """`(out, groups)` zero points in [0, 15] -> int32 `(ceil(out / 8), groups)`, packed along
  the output axis as compressed-tensors stores them."""
  zp = np.asarray(zp, np.uint8).T
  zp = np.pad(zp, [(0, 0), (0, -zp.shape[1] % 8)])
  return pack_int32(np.asarray(Q.pack_int4(zp)), 4).T.copy()


def compressed_tensors_tensors(module: str, q: Q.QuantizedArray, i: int | None
                               ) -> list[Tensor]:
  """compressed-tensors tensors of one module: FP8 `weight` (naive-quantized) or int
  `weight_packed` + `weight_shape` (pack-quantized), `weight_scale`, `weight_zero_point`."""
  kind = q.format.kind
  out, inp = q.matrix_shape
  scale_shape = (1,) if q.format is Q.QuantFormat.FP8_TENSOR else q.scale.shape[-2:]
  scale = _lazy(f"{module}.weight_scale", scale_shape, np.float32,
                lambda: _at(q.scale, i).reshape(scale_shape).astype(jnp.float32))
  if kind == "fp8":
    return [_lazy(f"{module}.weight", q.matrix_shape, q.values.dtype, lambda: _at(q.values, i)),
            scale]
  bits = 8 if kind == "int8" else 4
  tensors = [_lazy(f"{module}.weight_packed", (out, inp * bits // 32), np.int32,
                   lambda: pack_int32(np.asarray(_at(q.values, i)), bits)), scale]
  if q.zero_point is not None:
    tensors.append(_lazy(f"{module}.weight_zero_point", (-(-out // 8), q.zero_point.shape[-1]),
                         np.int32, lambda: _pack_zero_points(np.asarray(_at(q.zero_point, i)))))
  tensors.append(_lazy(f"{module}.weight_shape", (2,), np.int64,
                       lambda: np.array([out, inp], np.int64)))
  return tensors


def hf_tensors(params: dict, cfg: LlamaConfig, family: str) -> list[Tensor]:
  """Every tensor of a quantized HF checkpoint (`family` 'fp8' or 'compressed-tensors'), each
  sliced out of the stacked params only when written."""
  encode = fp8_tensors if family == "fp8" else compressed_tensors_tensors
  out = []
  for spec, i in _hf_order(cfg):
    name = spec.hf_name.format(i=i) if i is not None else spec.hf_name
    leaf = axes.get(params, spec)
    if Q.is_quantized(leaf):
      out += encode(name.removesuffix(".weight"), leaf, i)
    else:
      out.append(_dense(name, spec, cfg, leaf, i))
  return out


# ---------------------------------------------------------------------------- configs


def _module_regex(spec: axes.ParamSpec) -> str:
  module = spec.hf_name.split("{i}.")[-1].removesuffix(".weight")
  return "re:.*" + re.escape(module) + "$"


def compressed_tensors_config(params: dict, cfg: LlamaConfig, fmt: Q.QuantFormat) -> dict:
  """`quantization_config` for a compressed-tensors checkpoint of `params`.

  One config group per distinct scale block, so INT4 layers whose input size forced a smaller
  group are described exactly (targets are module-name regexes then, else `Linear`).
  """
  strategy = {Q.QuantFormat.FP8_TENSOR: "tensor", Q.QuantFormat.FP8_CHANNEL: "channel",
              Q.QuantFormat.INT8_CHANNEL: "channel"}.get(fmt, "group")
  by_group: dict[int | None, list[str]] = {}
  for spec, leaf in axes.iter_leaves(params, cfg):
    if Q.is_quantized(leaf):
      key = leaf.block[1] if strategy == "group" else None
      by_group.setdefault(key, []).append(_module_regex(spec))
  # Weight-only schemes: compressed-tensors packs ints (what vLLM's W4A16 / W8A16 kernels
  # read) and stores FP8 as is.
  fmt_name = "naive-quantized" if fmt.kind == "fp8" else "pack-quantized"
  groups = {}
  ordered = sorted(by_group.items(), key=lambda kv: -(kv[0] or 0))  # largest group first
  for k, (group_size, targets) in enumerate(ordered):
    weights = {"num_bits": 8 if fmt.kind in ("fp8", "int8") else 4,
               "type": "float" if fmt.kind == "fp8" else "int",
               "symmetric": not fmt.asymmetric, "strategy": strategy,
               "group_size": group_size, "dynamic": False, "observer": "minmax"}
    groups[f"group_{k}"] = {"targets": ["Linear"] if len(by_group) == 1 else targets,
                            "weights": weights, "input_activations": None,
                            "output_activations": None, "format": fmt_name}
  return {"quant_method": "compressed-tensors", "format": fmt_name,
          "quantization_status": "compressed", "config_groups": groups,
          "ignore": ["lm_head"], "kv_cache_scheme": None}


def fp8_config(params: dict, cfg: LlamaConfig, fmt: Q.QuantFormat) -> dict:
  """`quantization_config` of transformers' fine-grained FP8."""
  static = any(Q.is_quantized(x) and x.input_scale is not None
               for _, x in axes.iter_leaves(params, cfg))
  del fmt  # FP8_BLOCK only: per-tensor / per-channel FP8 go to compressed-tensors
  return {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic",
          "weight_block_size": [Q.FP8_BLOCK, Q.FP8_BLOCK], "modules_to_not_convert": ["lm_head"]}


def family(fmt: Q.QuantFormat) -> str:
  if fmt.is_gguf:
    return "gguf"
  return "fp8" if fmt is Q.QuantFormat.FP8_BLOCK else "compressed-tensors"


def check_consumer_shape(name: str, out: int, inp: int, fmt: Q.QuantFormat) -> None:
  """Raises ValueError where the consumers of `fmt` cannot load an `[out, inp]` matrix.

  transformers' fine-grained FP8 (its CPU dequantization, and vLLM's block-FP8 kernels) needs
  whole 128x128 blocks; compressed-tensors packs `32 / bits` inputs per int32 word.
  """
  if fmt is Q.QuantFormat.FP8_BLOCK and (out % Q.FP8_BLOCK or inp % Q.FP8_BLOCK):
    raise ValueError(f"fp8: {name} is {out}x{inp}, not whole {Q.FP8_BLOCK}x{Q.FP8_BLOCK} "
                     f"blocks, which transformers and vLLM's block-FP8 kernels need; use "
                     f"fp8_channel")
  if fmt.kind in ("int8", "int4") and not fmt.is_gguf:
    words = 32 // (8 if fmt.kind == "int8" else 4)
    if inp % words:
      raise ValueError(f"{fmt.value}: {name} has {inp} inputs; compressed-tensors packs "
                       f"{words} per int32 word")


def check_consumers(cfg: LlamaConfig, fmt: Q.QuantFormat, include_embeddings: bool = False
                    ) -> None:
  """`check_consumer_shape` for every matrix `fmt` quantizes, before any weight is read."""
  for spec in axes.param_specs(cfg):
    if Q.is_quantizable(spec, include_embeddings):
      check_consumer_shape(spec.hf_name.replace("{i}", "*"), *axes.hf_shape(spec, cfg), fmt)


def check_exportable(params: dict, cfg: LlamaConfig, fmt: Q.QuantFormat) -> None:
  for spec, leaf in axes.iter_leaves(params, cfg):
    if not Q.is_quantized(leaf):
      continue
    check_consumer_shape(spec.hf_name.replace("{i}", "*"), *leaf.matrix_shape, fmt)
    if leaf.format is not fmt:
      raise ValueError(f"{spec.name} is {leaf.fmt}, the export is {fmt.value}")
    if axes.VOCAB in spec.axes and not fmt.is_gguf:
      raise ValueError("quantized embeddings / LM head are exported to GGUF only")
    if leaf.input_scale is not None and family(fmt) != "fp8":
      raise ValueError("static activation scales are exported in the fp8 format only")


def write_hf(params: dict, cfg: LlamaConfig, fmt: Q.QuantFormat, out_dir: str,
             source_dir: str | None = None) -> None:
  """Writes a quantized HF directory into an existing (temporary) `out_dir`."""
  fam = family(fmt)
  tensors = hf_tensors(params, cfg, fam)
  write(os.path.join(out_dir, hf_io.SINGLE_FILE), tensors, metadata={"format": "pt"})
  dense = {t[2] for t in tensors if t[0].endswith("norm.weight")}
  torch_dtype = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(
      next(iter(dense)), "bfloat16")
  hf_cfg = cfg.to_hf(torch_dtype=torch_dtype)
  hf_cfg["quantization_config"] = (fp8_config if fam == "fp8" else
                                   compressed_tensors_config)(params, cfg, fmt)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  copy_aux_files(source_dir, out_dir, cfg)


def copy_aux_files(source_dir: str | None, out_dir: str, cfg: LlamaConfig) -> None:
  """Tokenizer files and generation config from `source_dir` (a default generation config
  otherwise)."""
  if source_dir is not None:
    for fn in hf_io.AUX_FILES:
      src = os.path.join(source_dir, fn)
      if os.path.isfile(src):
        shutil.copy2(src, os.path.join(out_dir, fn))
  if not os.path.isfile(os.path.join(out_dir, "generation_config.json")):
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.to_hf()["eos_token_id"]}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(gen, f, indent=2)


def export_params(params: dict, cfg: LlamaConfig, fmt: Q.QuantFormat,
                  unquantized_dtype: str = "bfloat16") -> dict:
  """The params exactly as the export stores them: leaves left unquantized are cast to
  `unquantized_dtype` (GGUF: matrices to float16, norms stay float32)."""
  if fmt.is_gguf:
    return axes.tree_from_leaves(
        (s, x if Q.is_quantized(x) else
         jnp.asarray(x).astype(jnp.float16 if len(s.hf_axes) == 2 else jnp.float32))
        for s, x in axes.iter_leaves(params, cfg))
  if unquantized_dtype not in DENSE_DTYPES:
    raise ValueError(f"unquantized_dtype must be one of {list(DENSE_DTYPES)}, got "
                     f"{unquantized_dtype!r}")
  return Q.cast_unquantized(params, DENSE_DTYPES[unquantized_dtype])


def export(params: dict, cfg: LlamaConfig, fmt: Q.QuantFormat, out_dir: str, *,
           source_dir: str | None = None, overwrite: bool = False) -> str:
  """Writes quantized `params` (from `quantize.quantize_params`) as an export of `fmt`.

  Args:
    params: quantized params (unquantized leaves are written in their own dtype).
    cfg: config.
    fmt: weight format; decides the family (fine-grained FP8, compressed-tensors, GGUF).
    out_dir: output directory, written atomically.
    source_dir: tokenizer files come from here (GGUF needs them for its vocabulary).
    overwrite: replace a non-empty `out_dir`.

  Returns:
    The absolute output directory.
  """
  check_exportable(params, cfg, fmt)
  with hf_io.atomic_output_dir(out_dir, overwrite) as tmp:
    write_into(params, cfg, fmt, tmp, source_dir)
  return os.path.abspath(out_dir)


def write_into(params: dict, cfg: LlamaConfig, fmt: Q.QuantFormat, tmp: str,
               source_dir: str | None, gguf_tokenizer_pre: str = "") -> None:
  """Writes the export of `fmt` into an existing directory. A pruned Gemma's kept embedding
  scale is folded into its embedding first (`model.fold_embed_scale`): consumers derive the
  scale from `hidden_size`."""
  params, cfg = M.fold_embed_scale(params, cfg)
  if fmt.is_gguf:
    from minitron_jax.quantize import gguf_export
    gguf_export.write_gguf(params, cfg, os.path.join(tmp, gguf_export.gguf_file_name(fmt)),
                           source_dir, tokenizer_pre=gguf_tokenizer_pre)
    copy_aux_files(source_dir, tmp, cfg)
  else:
    write_hf(params, cfg, fmt, tmp, source_dir)


# ---------------------------------------------------------------------------- pipeline


def bf16_bytes(cfg: LlamaConfig) -> int:
  """Tensor bytes of a bfloat16 export of the same model."""
  return 2 * cfg.num_params()


def notes(cfg: LlamaConfig, fmt: Q.QuantFormat) -> list[str]:
  """Known limits of consumers for this model and format."""
  del cfg
  out = []
  if fmt is Q.QuantFormat.INT4_GROUP_ASYM:
    out.append("transformers loads it with CompressedTensorsConfig(dequantize=True)")
  return out


def format_report(report: dict) -> str:
  """A few human lines summarising a report."""
  size = report["size"]
  lines = [f"wrote {report['output_dir']} ({report['format']}, {report['method']}: "
           f"{size['bytes'] / 1e6:.1f} MB, "
           f"{size['ratio_vs_bf16']:.3f}x of bf16)",
           f"weights: mean relative RMS error {report['error_summary']['mean_rel_rms_error']:.4f}"
           f", max {report['error_summary']['max_rel_rms_error']:.4f}"]
  if "perplexity" in report:
    p = report["perplexity"]
    lines.append(f"perplexity {p['before']:.3f} -> {p['after']:.3f} "
                 f"({p['windows']} windows, {p['tokens']} tokens)")
  lines += [f"note: {n}" for n in report.get("notes", [])]
  return "\n".join(lines)


def summarize(stats: dict[str, dict]) -> dict:
  rel = [s["rel_rms_error"] for s in stats.values()]
  return {"tensors": len(rel), "mean_rel_rms_error": float(np.mean(rel)) if rel else 0.0,
          "max_rel_rms_error": float(np.max(rel)) if rel else 0.0,
          "max_abs_error": max((s["max_abs_error"] for s in stats.values()), default=0.0)}
