"""Quantized params -> one llama.cpp GGUF file (Q8_0 / Q4_0 projections, F32 norms).

Tensor names and the q/k row permutation follow llama.cpp's converter (the inverse of
`gguf_import`), and the file carries the architecture and tokenizer metadata (tokens, types,
merges, pre-tokenizer, special ids and flags, chat template), so llama.cpp and transformers' GGUF
reader load it.
Quantized blocks are encoded from the `QuantizedArray` values and scales, byte for byte what
`gguf.quants.quantize` produces for the same weights.
"""

from __future__ import annotations

import json
import os

import gguf
import jax
import numpy as np

from minitron_jax import axes
from minitron_jax.quantize import formats as Q
from minitron_jax.config import LlamaConfig, rope_inv_freq_and_scale
from minitron_jax.io import gguf_tokenizer
from minitron_jax.io.gguf_import import GLOBAL_TENSORS, LAYER_TENSORS, permute_qk

_GGUF_NAMES = {v: k for k, v in GLOBAL_TENSORS.items()}
_GGUF_LAYER = {v: k for k, v in LAYER_TENSORS.items()}
_FILE_TYPES = {Q.QuantFormat.GGUF_Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
               Q.QuantFormat.GGUF_Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0}
_QTYPES = {Q.QuantFormat.GGUF_Q8_0: gguf.GGMLQuantizationType.Q8_0,
           Q.QuantFormat.GGUF_Q4_0: gguf.GGMLQuantizationType.Q4_0}


def gguf_file_name(fmt: Q.QuantFormat) -> str:
  return f"model-{fmt.value.removeprefix('gguf_').upper()}.gguf"


def gguf_tensor_name(hf_name: str) -> str:
  """HF Llama tensor name -> llama.cpp's."""
  if hf_name in _GGUF_NAMES:
    return _GGUF_NAMES[hf_name]
  _, _, i, rest = hf_name.split(".", 3)
  return f"blk.{i}.{_GGUF_LAYER[rest.removesuffix('.weight')]}.weight"


def encode_blocks(q: Q.QuantizedArray) -> np.ndarray:
  """Q8_0 / Q4_0 bytes `(out, in / 32 * block_bytes)` of one layer's quantized matrix."""
  fmt = q.format
  if not fmt.is_gguf:
    raise ValueError(f"{fmt.value} cannot be written to GGUF (use gguf_q8_0 or gguf_q4_0)")
  out, inp = q.matrix_shape
  nb = inp // Q.GGUF_BLOCK
  d = np.asarray(q.scale, np.float16).reshape(out, nb, 1).view(np.uint8)
  if fmt.kind == "int8":
    body = np.asarray(q.values, np.int8).reshape(out, nb, Q.GGUF_BLOCK).view(np.uint8)
  else:  # element j in the low nibble of byte j, element j + 16 in its high nibble
    nib = np.asarray(Q.unpack_int4(q.values, inp)).reshape(out, nb, 2, Q.GGUF_BLOCK // 2)
    body = nib[:, :, 0] | (nib[:, :, 1] << 4)
  return np.concatenate([d, body], axis=-1).reshape(out, -1)


def _permute(name: str, x: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
  if name.endswith("q_proj.weight"):
    return permute_qk(x, cfg.num_attention_heads)
  if name.endswith("k_proj.weight"):
    return permute_qk(x, cfg.num_key_value_heads)
  return x


def _add_tensors(w: gguf.GGUFWriter, params: dict, cfg: LlamaConfig) -> None:
  for spec in axes.param_specs(cfg):
    leaf = axes.get(params, spec)
    for i in range(cfg.num_hidden_layers) if spec.stacked else [None]:
      name = spec.hf_name.format(i=i) if i is not None else spec.hf_name
      one = leaf if i is None else jax.tree_util.tree_map(lambda a, i=i: a[i], leaf)
      if Q.is_quantized(one):
        data = _permute(name, encode_blocks(one), cfg)
        w.add_tensor(gguf_tensor_name(name), data, raw_dtype=_QTYPES[one.format])
      else:
        x = axes.to_hf_layout(np.asarray(one), spec)
        x = x.astype(np.float32 if x.ndim == 1 else np.float16)
        w.add_tensor(gguf_tensor_name(name), np.ascontiguousarray(_permute(name, x, cfg)))
  if cfg.rope_scaling.rope_type == "llama3":
    w.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg))


def _llama3_rope_factors(cfg: LlamaConfig) -> np.ndarray:
  """llama.cpp keeps llama3 RoPE scaling as per-frequency divisors of the base frequencies."""
  base, _ = rope_inv_freq_and_scale(cfg.replace(rope_scaling=type(cfg.rope_scaling)()))
  scaled, _ = rope_inv_freq_and_scale(cfg)
  return (base / scaled).astype(np.float32)


def _add_architecture(w: gguf.GGUFWriter, cfg: LlamaConfig, fmt: Q.QuantFormat,
                      name: str) -> None:
  w.add_name(name)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_file_type(_FILE_TYPES[fmt])
  w.add_quantization_version(gguf.GGML_QUANT_VERSION)
  rope = cfg.rope_scaling
  if rope.rope_type == "linear":
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(rope.factor)
  elif rope.rope_type not in ("default", "llama3"):  # llama3: the rope_freqs tensor
    raise ValueError(f"GGUF export does not support rope type {rope.rope_type!r}")


def check_inputs(cfg: LlamaConfig, source_dir: str, tokenizer_pre: str = "") -> None:
  """Raises ValueError, before any weight is read, for what GGUF export cannot write
  (arguments as for `write_gguf`)."""
  from minitron_jax.io import hf as hf_io

  if cfg.rope_scaling.rope_type not in ("default", "linear", "llama3"):
    raise ValueError(f"GGUF export does not support rope type {cfg.rope_scaling.rope_type!r}")
  check_tokenizer(source_dir)
  gguf_tokenizer.resolve_pre_tokenizer(source_dir, hf_io.load_tokenizer(source_dir),
                                       tokenizer_pre)


def check_tokenizer(source_dir: str) -> None:
  """Raises ValueError unless `source_dir` has a byte-level BPE `tokenizer.json` (the
  `gpt2` tokenizer model of llama.cpp, as Llama 3 and SmolLM2 use)."""
  path = os.path.join(source_dir, "tokenizer.json")
  if not os.path.isfile(path):
    raise ValueError(f"{source_dir}: GGUF export needs tokenizer.json for the vocabulary")
  with open(path, encoding="utf-8") as f:
    tj = json.load(f)
  kinds = json.dumps(tj.get("pre_tokenizer")) + json.dumps(tj.get("decoder"))
  if tj.get("model", {}).get("type") != "BPE" or "ByteLevel" not in kinds:
    raise ValueError(f"{path}: GGUF export supports byte-level BPE tokenizers only")


def _add_tokenizer(w: gguf.GGUFWriter, cfg: LlamaConfig, source_dir: str, pre: str) -> None:
  """Byte-level BPE vocabulary in llama.cpp's `gpt2` tokenizer model, as its converter writes
  it: one entry per id (holes as `[PAD<i>]`), special added tokens marked CONTROL; `pre` as
  `tokenizer_pre` of `write_gguf`."""
  from minitron_jax.io import hf as hf_io

  check_tokenizer(source_dir)
  tok = hf_io.load_tokenizer(source_dir)
  vocab = {i: t for t, i in tok.get_vocab().items()}
  added = tok.added_tokens_decoder
  tokens, types = [], []
  for i in range(cfg.vocab_size):
    if i not in vocab:
      tokens.append(f"[PAD{i}]")
      types.append(gguf.TokenType.UNUSED)
    elif i in added:
      tokens.append(vocab[i])
      types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    else:
      tokens.append(vocab[i])
      types.append(gguf.TokenType.NORMAL)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(gguf_tokenizer.resolve_pre_tokenizer(source_dir, tok, pre))
  w.add_token_list(tokens)
  w.add_token_types(types)
  special = gguf.SpecialVocab(source_dir, load_merges=True, n_vocab=cfg.vocab_size)
  eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
  for kind, value in (("bos", cfg.bos_token_id), ("eos", eos), ("pad", cfg.pad_token_id)):
    if value is not None:  # the tokenizer files' own ids win
      special.special_token_ids.setdefault(kind, value)
  # What the tokenizer does to plain text, which its config and post-processor decide together.
  ids = tok("a")["input_ids"]
  special.add_special_token["bos"] = tok.bos_token_id is not None and ids[0] == tok.bos_token_id
  special.add_special_token["eos"] = tok.eos_token_id is not None and ids[-1] == tok.eos_token_id
  if special.chat_template is None and getattr(tok, "chat_template", None):
    special.chat_template = tok.chat_template
  special.add_to_gguf(w, quiet=True)


def write_gguf(params: dict, cfg: LlamaConfig, path: str, source_dir: str | None, *,
               name: str = "minitron-jax", tokenizer_pre: str = "") -> None:
  """Writes quantized `params` (GGUF formats) to one GGUF file.

  Args:
    params: params from `quantize.quantize_params` with a GGUF format; unquantized matrices
      are written as F16, norms as F32.
    cfg: config.
    path: the `.gguf` file.
    source_dir: HF directory whose tokenizer goes into the metadata (None: no tokenizer).
    name: `general.name`.
    tokenizer_pre: llama.cpp pre-tokenizer name (e.g. `llama-bpe`, `smollm`); empty: the name
      recorded when `source_dir` was imported from GGUF, else the one llama.cpp's converter
      detects (ValueError if it knows none).
  """
  fmts = {x.format for _, x in axes.iter_leaves(params, cfg) if Q.is_quantized(x)}
  if len(fmts) != 1 or not next(iter(fmts)).is_gguf:
    raise ValueError(f"GGUF export needs params quantized with one GGUF format, got "
                     f"{sorted(f.value for f in fmts)}")
  fmt = fmts.pop()
  w = gguf.GGUFWriter(path, "llama")
  _add_architecture(w, cfg, fmt, name)
  if source_dir is not None:
    _add_tokenizer(w, cfg, source_dir, tokenizer_pre)
  _add_tensors(w, params, cfg)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
