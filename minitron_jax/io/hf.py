"""HF Llama directories <-> our param tree, tensor by tensor, without torch.

Loading reads one HF tensor at a time from memory-mapped safetensors into the stacked arrays,
so peak host memory stays near the model's size. Saving (`save_hf`, from `hf_write`) streams
tensors into shards and writes the whole directory under a temporary name that is renamed into
place only when complete, so a failure never leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from minitron_jax import axes
from minitron_jax.config import LlamaConfig
from minitron_jax.io import hf_compat
from minitron_jax.io.files import atomic_output_dir  # noqa: F401  (part of this API)
from minitron_jax.io.hf_write import (  # noqa: F401  (this module is the API for HF dirs)
    AUX_FILES, DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, SINGLE_FILE, save_hf, torch_dtype_name,
    write_config, write_weights)
from minitron_jax.io.safetensors import SafetensorsFile

# Tensors some checkpoints carry that hold nothing the model needs.
_IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
  """A checkpoint that does not match its config or our model."""


def load_config(model_dir: str | os.PathLike, dtype: str = "float32") -> LlamaConfig:
  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"{model_dir}: not a directory")
  return LlamaConfig.from_json_file(os.path.join(model_dir, "config.json"), dtype=dtype)


def _open_files(model_dir: str) -> dict[str, SafetensorsFile]:
  """Tensor name -> the open file that holds it."""
  index = os.path.join(model_dir, INDEX_FILE)
  single = os.path.join(model_dir, SINGLE_FILE)
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    files = {fn: SafetensorsFile(os.path.join(model_dir, fn)) for fn in set(weight_map.values())}
    out = {}
    for name, fn in weight_map.items():
      if name not in files[fn]:
        raise CheckpointError(f"{index}: tensor {name} is not in {fn}")
      out[name] = files[fn]
    return out
  if os.path.isfile(single):
    f = SafetensorsFile(single)
    return {name: f for name in f.keys()}
  if any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(model_dir)):
    raise CheckpointError(f"{model_dir}: only safetensors checkpoints are read (pickled "
                          "PyTorch files are never unpickled)")
  raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def load_hf(model_dir: str | os.PathLike, *, dtype: str = "float32", param_dtype=None,
            shardings: Any = None) -> tuple[dict, LlamaConfig]:
  """Loads an HF Llama directory.

  Args:
    model_dir: directory with config.json and safetensors weights (single or sharded).
    dtype: compute dtype stored in the returned config.
    param_dtype: cast params to this dtype; default keeps the checkpoint's dtype.
    shardings: optional tree (like the params) of `jax.sharding.Sharding` to place leaves on.

  Returns:
    (params, config).
  """
  model_dir = os.fspath(model_dir)
  cfg = load_config(model_dir, dtype=dtype)
  files = _open_files(model_dir)
  expected = set()
  leaves = []
  for spec in axes.param_specs(cfg):
    names = ([spec.hf_name.format(i=i) for i in range(cfg.num_hidden_layers)]
             if spec.stacked else [spec.hf_name])
    expected.update(names)
    for name in names:
      if name not in files:
        raise CheckpointError(f"{model_dir}: tensor {name} is missing")
    src_dtype = files[names[0]].dtype(names[0])
    out_dtype = np.dtype(param_dtype) if param_dtype is not None else src_dtype
    arr = np.empty(axes.shape(spec, cfg), out_dtype)
    for i, name in enumerate(names):
      if files[name].dtype(name) != src_dtype:
        raise CheckpointError(f"{model_dir}: tensor {name} is {files[name].dtype(name)}, "
                              f"other layers are {src_dtype}")
      x = axes.from_hf_layout(files[name].get(name), spec, cfg, name)
      if spec.stacked:
        arr[i] = x
      else:
        arr[...] = x
    leaves.append((spec, arr))
  extra = sorted(n for n in set(files) - expected
                 if not n.endswith(_IGNORABLE_SUFFIXES)
                 and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
  if extra:
    raise CheckpointError(f"{model_dir}: unsupported tensor(s) {extra[:5]}"
                          f"{' ...' if len(extra) > 5 else ''} (biases or another architecture?)")
  tree = axes.tree_from_leaves(leaves)
  if shardings is None:
    return jax.tree_util.tree_map(jax.numpy.asarray, tree), cfg
  return jax.tree_util.tree_map(jax.device_put, tree, shardings), cfg


def open_checkpoint(model_dir: str | os.PathLike) -> dict[str, SafetensorsFile]:
  """Tensor name -> open (memory-mapped) file, for streaming over a big checkpoint."""
  return _open_files(os.fspath(model_dir))


def load_model(model_dir: str, dtype: str = "float32", with_tokenizer: bool = True):
  """Resolves a directory, short name or hub id and loads (params, cfg, tokenizer, path)."""
  from minitron_jax.io import registry  # pulls in the GGUF converter: only when a name is loaded

  path = str(registry.resolve_model_dir(model_dir))
  params, cfg = load_hf(path, dtype=dtype)
  tok = load_tokenizer(path) if with_tokenizer else None
  return params, cfg, tok, path


def load_tokenizer(model_dir: str):
  """The directory's tokenizer, as `transformers.AutoTokenizer` loads it.

  AutoTokenizer builds the model config to choose the tokenizer class, and transformers 5.x
  refuses valid pruned configs there (`hf_compat`); for those the relaxation is applied first,
  so every shape pruning writes gets exactly the tokenizer transformers would pick.
  """
  import transformers

  if not any(os.path.isfile(os.path.join(model_dir, f))
             for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
    raise FileNotFoundError(f"{model_dir}: no tokenizer files (tokenizer.json)")
  config_path = os.path.join(model_dir, "config.json")
  if os.path.isfile(config_path):
    with open(config_path, encoding="utf-8") as f:
      if hf_compat.refused_by_transformers5(json.load(f)):
        hf_compat.allow_explicit_head_dim()
  return transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
