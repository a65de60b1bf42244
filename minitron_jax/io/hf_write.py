"""Writing HF directories (every family of `config.ARCHITECTURES`) from our param tree,
tensor by tensor, without torch.

Tensors stream into safetensors shards, and the whole directory is written under a temporary
name that is renamed into place only when complete, so a failure never leaves a directory that
looks finished. `hf` is the API (it re-exports these names); this half stands apart so that the
model registry, which `hf.load_model` uses to resolve names, can write its random models
without an import cycle.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable

import jax
import numpy as np

from minitron_jax import axes, model
from minitron_jax.config import LlamaConfig
from minitron_jax.io.files import atomic_output_dir
from minitron_jax.io.safetensors import write

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Files copied verbatim from a source model directory on save.
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "tokenizer.model", "generation_config.json", "chat_template.jinja",
             "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt")


def _hf_tensors(params: dict, cfg: LlamaConfig, dtype) -> list[tuple[str, tuple, np.dtype,
                                                                       Callable[[], np.ndarray]]]:
  """(name, shape, dtype, produce) for every HF tensor, layer-major like HF's own files."""
  out = []

  def produce(spec, i):
    def f():
      leaf = axes.get(params, spec)
      x = np.asarray(jax.device_get(leaf[i] if i is not None else leaf))
      return axes.to_hf_layout(x, spec).astype(dtype or x.dtype)
    return f

  specs = axes.param_specs(cfg)
  for spec in specs:
    if not spec.stacked and spec.path != ("final_norm",) and spec.path != ("lm_head",):
      out.append((spec.hf_name, spec, None))
  for i in range(cfg.num_hidden_layers):
    for spec in specs:
      if spec.stacked:
        out.append((spec.hf_name.format(i=i), spec, i))
  for spec in specs:
    if spec.path in (("final_norm",), ("lm_head",)):
      out.append((spec.hf_name, spec, None))
  result = []
  for name, spec, i in out:
    leaf_dtype = np.dtype(dtype or axes.get(params, spec).dtype)
    result.append((name, axes.hf_shape(spec, cfg), leaf_dtype, produce(spec, i)))
  return result


def _shard(tensors, max_bytes: int) -> list[list]:
  shards, cur, size = [], [], 0
  for t in tensors:
    nbytes = int(np.prod(t[1])) * t[2].itemsize
    if cur and size + nbytes > max_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(t)
    size += nbytes
  return shards + [cur]


def write_weights(out_dir: str, tensors: list, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
                  ) -> None:
  """Streams (name, shape, dtype, produce) tensors into `model.safetensors`, or into shards
  with `model.safetensors.index.json` when they exceed `max_shard_bytes`."""
  shards = _shard(tensors, max_shard_bytes)
  if len(shards) == 1:
    write(os.path.join(out_dir, SINGLE_FILE), shards[0], metadata={"format": "pt"})
    return
  weight_map, total = {}, 0
  for k, shard in enumerate(shards):
    fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    total += write(os.path.join(out_dir, fn), shard, metadata={"format": "pt"})
    weight_map.update({t[0]: fn for t in shard})
  with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_config(out_dir: str, cfg: LlamaConfig, *, torch_dtype: str = "float32",
                 source_dir: str | os.PathLike | None = None,
                 extra_config: dict | None = None) -> None:
  """config.json, the tokenizer files copied from `source_dir`, and generation_config.json."""
  if cfg.embed_scale != cfg.hf_embed_scale:
    raise ValueError(f"embed_scale {cfg.embed_scale} is not the {cfg.hf_embed_scale} "
                     "transformers derives for this config: fold it first "
                     "(model.fold_embed_scale)")
  hf_cfg = cfg.to_hf(torch_dtype=torch_dtype)
  hf_cfg.update(extra_config or {})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  if source_dir is not None:
    for fn in AUX_FILES:
      src = os.path.join(os.fspath(source_dir), fn)
      if os.path.isfile(src):
        shutil.copy2(src, os.path.join(out_dir, fn))
  if not os.path.isfile(os.path.join(out_dir, "generation_config.json")):
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": hf_cfg["eos_token_id"]}
    if cfg.pad_token_id is not None:
      gen["pad_token_id"] = cfg.pad_token_id
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(gen, f, indent=2)


def torch_dtype_name(dtypes) -> str:
  dtypes = {np.dtype(d) for d in dtypes}
  if len(dtypes) != 1:
    return "float32"
  return {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(
      dtypes.pop(), "bfloat16")


def save_hf(params: dict, cfg: LlamaConfig, out_dir: str | os.PathLike, *,
            source_dir: str | os.PathLike | None = None, dtype=None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
            extra_config: dict | None = None, extra_files: Callable[[str], None] | None = None
            ) -> str:
  """Writes an HF Llama directory that transformers loads.

  Args:
    params: param tree.
    cfg: its config.
    out_dir: target directory (created atomically).
    source_dir: copy tokenizer files and generation config from here.
    dtype: cast tensors to this dtype on the way out; default keeps each leaf's dtype.
    max_shard_bytes: start a new shard beyond this many bytes (HF's default is 5 GB).
    overwrite: replace an existing non-empty `out_dir`.
    extra_config: keys merged into config.json.
    extra_files: called with the temporary directory to add files before it is published.

  Returns:
    The output directory.
  """
  params, cfg = model.fold_embed_scale(params, cfg)
  tensors = _hf_tensors(params, cfg, np.dtype(dtype) if dtype is not None else None)
  with atomic_output_dir(out_dir, overwrite) as tmp:
    write_weights(tmp, tensors, max_shard_bytes)
    write_config(tmp, cfg, torch_dtype=torch_dtype_name(t[2] for t in tensors),
                 source_dir=source_dir, extra_config=extra_config)
    if extra_files is not None:
      extra_files(tmp)
  return os.path.abspath(os.fspath(out_dir))
