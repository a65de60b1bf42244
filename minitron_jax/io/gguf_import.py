"""llama.cpp GGUF checkpoint of a Llama or Gemma 3 model -> Hugging Face model directory.

The output holds `config.json`, `generation_config.json`, a float32 `model.safetensors` with
HF tensor names, and the tokenizer files, so transformers and `hf_io.load_hf` read it like
any HF checkpoint. Quantised tensors are dequantised to float32: the result is exactly the
weights llama.cpp runs, not the unquantised originals.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import gguf
import numpy as np
from safetensors.numpy import save_file

from minitron_jax.io import gguf_arch
from minitron_jax.io import gguf_tokenizer
from minitron_jax.io.files import atomic_output_dir
from minitron_jax.io.gguf_arch import GLOBAL_TENSORS  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

LAYER_TENSORS = gguf_arch.LLAMA_LAYER


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Applies llama.cpp's q/k row permutation (HF layout -> GGUF layout).

  llama.cpp rotates interleaved pairs in RoPE while HF rotates the two halves of each head,
  so its converter reorders each head's rows. Kept as the reference the inverse is tested on.

  Args:
    w: `[n_head * head_dim, ...]` projection weight in HF row order.
    n_head: heads whose rows are permuted (query heads for q, key/value heads for k).

  Returns:
    The weight in GGUF row order, same shape.
  """
  half = _half_head_rows(w, n_head)
  return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverts `permute_qk` (GGUF row order -> HF row order); arguments as there."""
  half = _half_head_rows(w, n_head)
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _half_head_rows(w: np.ndarray, n_head: int) -> int:
  if n_head <= 0 or w.shape[0] % (2 * n_head):
    raise ValueError(f"cannot split {w.shape[0]} rows into {n_head} heads of even size")
  return w.shape[0] // n_head // 2


def hf_tensor_name(gguf_name: str, model_type: str = "llama") -> str:
  """Maps a llama.cpp tensor name to its HF name; ValueError if there is none."""
  return gguf_arch.for_model_type(model_type).hf_name(gguf_name)


def round_float32(x: float) -> float:
  """The short decimal a float32 value was written from (9.99999974e-06 -> 1e-05)."""
  return float(f"{float(np.float32(x)):.6g}")


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
  """GGUF key/value metadata as plain Python values.

  Float32 values are rounded back to their short decimal form. The big tokenizer arrays are
  left out (`gguf_tokenizer.tokenizer_metadata` reads them); `<key>.length` keeps their sizes.
  """
  meta: dict[str, Any] = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    if key.startswith("tokenizer.ggml.") and field.types[0] == gguf.GGUFValueType.ARRAY:
      meta[f"{key}.length"] = len(field.data)
      continue
    value = field.contents()
    meta[key] = round_float32(value) if field.types == [gguf.GGUFValueType.FLOAT32] else value
  return meta


def hf_config(meta: Mapping[str, Any], tensor_names: set[str]) -> dict[str, Any]:
  """A complete HF config dict (`LlamaConfig` or `Gemma3TextConfig`) from GGUF metadata.

  Args:
    meta: output of `read_metadata`.
    tensor_names: the GGUF tensor names (they decide weight tying).

  Raises:
    ValueError: for another architecture, missing metadata or an unsupported feature.
  """
  arch = meta.get("general.architecture")
  if arch not in gguf_arch.FROM_GGUF:
    raise ValueError(f"unsupported GGUF architecture {arch!r}: only "
                     f"{', '.join(map(repr, gguf_arch.FROM_GGUF))} checkpoints can be converted")
  if arch == "gemma3":
    return gemma3_config(meta, tensor_names)
  return llama_config(meta, tensor_names)


def _getter(meta: Mapping[str, Any], arch: str):
  def get(key: str, default: Any = None) -> Any:
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
      raise ValueError(f"GGUF metadata lacks '{arch}.{key}'")
    return value
  return get


def llama_config(meta: Mapping[str, Any], tensor_names: set[str]) -> dict[str, Any]:
  """A complete HF `LlamaConfig` dict from the metadata of a `llama` GGUF (as `hf_config`)."""
  arch = "llama"
  get = _getter(meta, arch)

  hidden, heads = get("embedding_length"), get("attention.head_count")
  kv_heads = get("attention.head_count_kv", heads)
  if not isinstance(kv_heads, int):
    raise ValueError(f"per-layer key/value head counts {kv_heads!r} are not supported")
  head_dim = get("attention.key_length", hidden // heads)
  if get("attention.value_length", head_dim) != head_dim:
    raise ValueError("different key and value head sizes are not supported")
  if "rope_freqs.weight" in tensor_names:
    # llama3-style scaling: GGUF keeps only the derived frequencies, not the HF parameters.
    raise ValueError("GGUF tensor 'rope_freqs.weight' (llama3 rope scaling) is not supported")
  vocab = meta.get(f"{arch}.vocab_size", meta.get("tokenizer.ggml.tokens.length"))
  if vocab is None:
    raise ValueError(f"GGUF metadata lacks '{arch}.vocab_size' and a tokenizer vocabulary")
  rope_theta = float(get("rope.freq_base", 10000.0))
  rope_scaling = _rope_scaling(meta, arch)
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": vocab, "hidden_size": hidden,
      "intermediate_size": get("feed_forward_length"),
      "num_hidden_layers": get("block_count"),
      "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
      "hidden_act": "silu", "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
      "rope_theta": rope_theta, "rope_scaling": rope_scaling,
      # Newer transformers read RoPE settings from here; older ones ignore it.
      "rope_parameters": {"rope_theta": rope_theta, **(rope_scaling or {"rope_type": "default"})},
      "max_position_embeddings": get("context_length"),
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
      "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
      "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
      "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
  }


def _rope_scaling(meta: Mapping[str, Any], arch: str) -> dict[str, Any] | None:
  kind = meta.get(f"{arch}.rope.scaling.type", "none")
  if kind == "none":
    return None
  if kind == "linear":
    return {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
  raise ValueError(f"GGUF rope scaling type {kind!r} is not supported")


def gemma3_config(meta: Mapping[str, Any], tensor_names: set[str]) -> dict[str, Any]:
  """A complete HF `Gemma3TextConfig` dict from the metadata of a `gemma3` GGUF.

  What the file does not say is llama.cpp's fixed Gemma 3 behaviour (llama-model.cpp): every
  sixth layer global and the rest sliding-window, RoPE base 10000 on the sliding layers unless
  the file names one, and queries scaled by 1/sqrt(head_dim) except in the 62-layer (27B) model,
  which uses 1/sqrt(hidden / heads).
  """
  get = _getter(meta, "gemma3")
  hidden, heads, layers = (get("embedding_length"), get("attention.head_count"),
                           get("block_count"))
  kv_heads = get("attention.head_count_kv", heads)
  head_dim = get("attention.key_length", 256)
  if get("attention.value_length", head_dim) != head_dim:
    raise ValueError("different key and value head sizes are not supported")
  if "output.weight" in tensor_names:
    raise ValueError("GGUF tensor 'output.weight': Gemma 3 ties its output to the embedding")
  theta = float(get("rope.freq_base", 1_000_000.0))
  local = float(get("rope.freq_base_swa", gguf_arch.GEMMA3_ROPE_LOCAL_BASE))
  if get("rope.scaling.type", "none") != "none":
    raise ValueError(f"GGUF metadata 'gemma3.rope.scaling.type' "
                     f"{meta['gemma3.rope.scaling.type']!r} is not supported")
  softcap = meta.get("gemma3.final_logit_softcapping")
  return {
      "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
      "vocab_size": meta.get("gemma3.vocab_size", meta.get("tokenizer.ggml.tokens.length")),
      "hidden_size": hidden, "intermediate_size": get("feed_forward_length"),
      "num_hidden_layers": layers, "num_attention_heads": heads,
      "num_key_value_heads": kv_heads, "head_dim": head_dim,
      "hidden_activation": "gelu_pytorch_tanh",
      "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
      "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
      "sliding_window": get("attention.sliding_window"),
      "layer_types": gguf_arch.gemma3_layer_types(layers),
      "rope_theta": theta, "rope_local_base_freq": local, "rope_scaling": None,
      # Newer transformers read RoPE settings per layer type from here.
      "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": theta},
                          "sliding_attention": {"rope_type": "default", "rope_theta": local}},
      "max_position_embeddings": get("context_length"), "tie_word_embeddings": True,
      "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": None,
      "final_logit_softcapping": softcap, "use_bidirectional_attention": False,
      "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
      "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
      "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
  }


def expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> numpy shape that `config` implies."""
  d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
  q = config["num_attention_heads"] * config["head_dim"]
  kv = config["num_key_value_heads"] * config["head_dim"]
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  if not config["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (v, d)
  per_layer = {
      "self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
      "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
      "mlp.down_proj": (d, f), "input_layernorm": (d,), "post_attention_layernorm": (d,),
  }
  if config["model_type"] == "gemma3_text":
    h = config["head_dim"]
    per_layer.update({"self_attn.q_norm": (h,), "self_attn.k_norm": (h,),
                      "pre_feedforward_layernorm": (d,), "post_feedforward_layernorm": (d,)})
  for i in range(config["num_hidden_layers"]):
    shapes.update({f"model.layers.{i}.{k}.weight": s for k, s in per_layer.items()})
  return shapes


def convert_tensors(reader: gguf.GGUFReader, config: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Every GGUF tensor dequantised to float32, in HF naming and layout.

  Raises:
    ValueError: naming the tensor that is unknown, missing, or of the wrong shape.
  """
  shapes = expected_shapes(config)
  arch = gguf_arch.for_model_type(config["model_type"])
  out: dict[str, np.ndarray] = {}
  for t in reader.tensors:
    name = arch.hf_name(t.name)
    if name not in shapes:
      raise ValueError(f"GGUF tensor {t.name!r} ({name}) is not part of the model its metadata "
                       "describes")
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims fastest first
    if shape != shapes[name]:
      raise ValueError(f"GGUF tensor {t.name!r} ({name}) has shape {shape}, expected "
                       f"{shapes[name]} from the metadata")
    # np.array copies: an F32 tensor comes back as a view of the memory-mapped file.
    w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
    if arch.permute_qk and name.endswith("q_proj.weight"):
      w = unpermute_qk(w, config["num_attention_heads"])
    elif arch.permute_qk and name.endswith("k_proj.weight"):
      w = unpermute_qk(w, config["num_key_value_heads"])
    elif arch.norm_shift and arch.is_norm(name):
      w -= np.float32(arch.norm_shift)
    out[name] = np.ascontiguousarray(w)
  missing = sorted(set(shapes) - set(out))
  if missing:
    raise ValueError(f"GGUF file lacks {len(missing)} tensor(s), first {missing[0]!r}")
  return out


def _write_json(path: Path, obj: Any) -> None:
  path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _relax_permissions(root: Path) -> None:
  # mkdtemp and the safetensors writer create owner-only entries; a shared model cache
  # should get the usual umask-derived permissions.
  umask = os.umask(0)
  os.umask(umask)
  for path in [root, *root.rglob("*")]:
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def gguf_to_hf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike,
               overwrite: bool = False) -> Path:
  """Converts a Llama or Gemma 3 GGUF file into a float32 HF model directory.

  Everything is written into a temporary sibling directory that is renamed into place at
  the end, so a failure never leaves a partial `output_dir`.

  Args:
    gguf_path: the `.gguf` file.
    output_dir: directory to create; it must be absent or empty unless `overwrite`.
    overwrite: replace an existing non-empty `output_dir`.

  Returns:
    The absolute output directory.

  Raises:
    ValueError: for another architecture, a tokenizer other than byte-level BPE or
      SentencePiece, or a tensor inconsistent with the metadata.
    FileExistsError: when `output_dir` is not empty and `overwrite` is false.
  """
  gguf_path, output_dir = Path(gguf_path).resolve(), Path(output_dir).resolve()
  with atomic_output_dir(output_dir, overwrite) as tmp:
    staging = Path(tmp)
    reader = gguf.GGUFReader(gguf_path)
    meta = read_metadata(reader)
    config = hf_config(meta, {t.name for t in reader.tensors})
    if "tokenizer.ggml.model" in meta:  # first: an unsupported tokenizer fails fast
      gguf_tokenizer.write_tokenizer_files(gguf_tokenizer.tokenizer_metadata(reader), staging,
                                           config["max_position_embeddings"])
    else:
      logger.warning("%s has no tokenizer; writing weights and config only", gguf_path)
    save_file(convert_tensors(reader, config), str(staging / "model.safetensors"),
              metadata={"format": "pt"})
    del reader  # closes the memory map before the rename
    _write_json(staging / "config.json", config)
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    _write_json(staging / "generation_config.json",
                {k: config[k] for k in ids if config[k] is not None})
    _relax_permissions(staging)
  return output_dir
