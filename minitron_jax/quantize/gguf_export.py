"""Quantized params -> one llama.cpp GGUF file (Q8_0 / Q4_0 projections, F32 norms).

The architecture follows the config's `model_type` (`io.gguf_arch`: `llama` for Llama and
Mistral, `qwen2`, `qwen3`, `gemma3`), and with it the tensor names, the q/k row permutation
(`llama` only) and Gemma's `1 + w` norms, as llama.cpp's converter writes them (the inverse of
`gguf_import`). The file carries the architecture and tokenizer metadata (tokens, types, merges
or scores, pre-tokenizer, special ids and flags, chat template), so llama.cpp and transformers'
GGUF reader load it.
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
from minitron_jax.io import gguf_arch
from minitron_jax.io import gguf_tokenizer
from minitron_jax.io.gguf_import import permute_qk

_FILE_TYPES = {Q.QuantFormat.GGUF_Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
               Q.QuantFormat.GGUF_Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0}
_QTYPES = {Q.QuantFormat.GGUF_Q8_0: gguf.GGMLQuantizationType.Q8_0,
           Q.QuantFormat.GGUF_Q4_0: gguf.GGMLQuantizationType.Q4_0}


def gguf_file_name(fmt: Q.QuantFormat) -> str:
  return f"model-{fmt.value.removeprefix('gguf_').upper()}.gguf"


def architecture(cfg) -> gguf_arch.GgufArch:
  """The GGUF form of `cfg`'s model type (Llama where the config has no `model_type`)."""
  return gguf_arch.for_model_type(getattr(cfg, "model_type", "llama"))


def gguf_tensor_name(hf_name: str, cfg=None) -> str:
  """HF tensor name -> llama.cpp's, for `cfg`'s architecture (Llama without one)."""
  return architecture(cfg).gguf_name(hf_name)


def gguf_tensor(hf_name: str, x: np.ndarray, cfg, qtype=None) -> np.ndarray:
  """One HF-layout tensor as llama.cpp stores it.

  Args:
    hf_name: its HF name.
    x: float values, or (with `qtype`) encoded blocks, one row per output row.
    cfg: the config (architecture, head counts).
    qtype: the `GGMLQuantizationType` of `x`'s blocks; None for float values.

  Returns:
    Norms + the architecture's shift as F32, other float tensors as F16 (1-D ones F32), q/k rows
    (weights and biases) permuted for the `llama` architecture; blocks as given, rows permuted.
  """
  arch = architecture(cfg)
  if qtype is None:
    x = np.asarray(x, np.float32)
    if arch.norm_shift and arch.is_norm(hf_name):
      x = x + np.float32(arch.norm_shift)
    x = x.astype(np.float32 if x.ndim == 1 else np.float16)
  if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
    x = permute_qk(x, cfg.num_attention_heads)
  elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
    x = permute_qk(x, cfg.num_key_value_heads)
  return np.ascontiguousarray(x)


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


def _hf_tensors(params: dict, cfg: LlamaConfig):
  """(HF name, float values in HF layout or encoded blocks, their qtype or None) per tensor."""
  for spec in axes.param_specs(cfg):
    leaf = axes.get(params, spec)
    for i in range(cfg.num_hidden_layers) if spec.stacked else [None]:
      name = spec.hf_name.format(i=i) if i is not None else spec.hf_name
      one = leaf if i is None else jax.tree_util.tree_map(lambda a, i=i: a[i], leaf)
      if Q.is_quantized(one):
        yield name, encode_blocks(one), _QTYPES[one.format]
      else:
        yield name, axes.to_hf_layout(np.asarray(one), spec), None


def _llama3_rope_factors(cfg: LlamaConfig) -> np.ndarray:
  """llama.cpp keeps llama3 RoPE scaling as per-frequency divisors of the base frequencies."""
  base, _ = rope_inv_freq_and_scale(cfg.replace(rope_scaling=type(cfg.rope_scaling)()))
  scaled, _ = rope_inv_freq_and_scale(cfg)
  return (base / scaled).astype(np.float32)


def check_architecture(cfg) -> None:
  """Raises ValueError for a config llama.cpp's architecture cannot reproduce, naming the field.

  llama.cpp's Gemma 3 fixes what the file cannot say (llama-model.cpp): a global layer after
  every five sliding-window ones, RoPE base 10000 on the sliding layers, and queries scaled by
  1/sqrt(head_dim) (1/sqrt(hidden / heads) in the 62-layer 27B model).
  """
  arch = architecture(cfg)
  if cfg.rope_scaling.rope_type not in ("default", "linear", "llama3"):
    raise ValueError(f"GGUF export does not support rope type {cfg.rope_scaling.rope_type!r}")
  if cfg.rope_scaling.rope_type == "llama3" and arch.name != "llama":
    raise ValueError(f"GGUF architecture {arch.name!r} has no llama3 rope scaling")
  if arch.name == "qwen2" and cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size:
    raise ValueError(f"num_attention_heads {cfg.num_attention_heads} x head_dim {cfg.head_dim} "
                     f"!= hidden_size {cfg.hidden_size}: llama.cpp's qwen2 architecture needs "
                     "them equal (its q/o projections are hidden x hidden)")
  if arch.name != "gemma3":
    return
  n = cfg.num_hidden_layers
  layer_types = list(getattr(cfg, "layer_types", None) or gguf_arch.gemma3_layer_types(n))
  if layer_types != gguf_arch.gemma3_layer_types(n):
    raise ValueError(f"layer_types {layer_types}: llama.cpp's Gemma 3 makes every sixth layer "
                     "global and the others sliding-window")
  local = getattr(cfg, "rope_local_base_freq", gguf_arch.GEMMA3_ROPE_LOCAL_BASE)
  if local != gguf_arch.GEMMA3_ROPE_LOCAL_BASE:
    raise ValueError(f"rope_local_base_freq {local}: llama.cpp's Gemma 3 uses "
                     f"{gguf_arch.GEMMA3_ROPE_LOCAL_BASE} on its sliding-window layers")
  scalar = cfg.hidden_size // cfg.num_attention_heads if n == 62 else cfg.head_dim
  if getattr(cfg, "query_pre_attn_scalar", scalar) != scalar:
    raise ValueError(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar}: llama.cpp's Gemma 3 "
                     f"with {n} layers scales queries by 1/sqrt({scalar})")


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
  if architecture(cfg).name == "gemma3":
    w.add_sliding_window(cfg.sliding_window)  # rope.freq_base above is the global layers'


def check_inputs(cfg: LlamaConfig, source_dir: str, tokenizer_pre: str = "") -> None:
  """Raises ValueError, before any weight is read, for what GGUF export cannot write
  (arguments as for `write_gguf`)."""
  from minitron_jax.io import hf as hf_io

  check_architecture(cfg)
  if check_tokenizer(source_dir) == "gpt2":
    gguf_tokenizer.resolve_pre_tokenizer(source_dir, hf_io.load_tokenizer(source_dir),
                                         tokenizer_pre)


def check_tokenizer(source_dir: str) -> str:
  """llama.cpp's tokenizer model for the `tokenizer.json` of `source_dir`: `gpt2` for
  byte-level BPE (Llama 3, SmolLM2, Qwen), `llama` for BPE with byte fallback over `▁`-spelled
  text (Gemma's SentencePiece vocabulary); ValueError for anything else."""
  path = os.path.join(source_dir, "tokenizer.json")
  if not os.path.isfile(path):
    raise ValueError(f"{source_dir}: GGUF export needs tokenizer.json for the vocabulary")
  with open(path, encoding="utf-8") as f:
    tj = json.load(f)
  kinds = json.dumps(tj.get("pre_tokenizer")) + json.dumps(tj.get("decoder"))
  model = tj.get("model", {})
  if model.get("type") == "BPE" and "ByteLevel" in kinds:
    return "gpt2"
  if model.get("type") == "BPE" and model.get("byte_fallback") and "ByteFallback" in kinds:
    return "llama"
  raise ValueError(f"{path}: GGUF export supports byte-level BPE and Gemma-style "
                   "(byte-fallback) tokenizers only")


def _add_tokenizer(w: gguf.GGUFWriter, cfg: LlamaConfig, source_dir: str, pre: str) -> None:
  """The vocabulary as llama.cpp's converter writes it: one entry per id (holes as `[PAD<i>]`),
  special added tokens marked CONTROL; byte-level BPE as the `gpt2` model with merges and
  `pre` (as `tokenizer_pre` of `write_gguf`), Gemma's as the SentencePiece `llama` model."""
  from minitron_jax.io import hf as hf_io

  model = check_tokenizer(source_dir)
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
  w.add_tokenizer_model(model)
  if model == "gpt2":
    w.add_tokenizer_pre(gguf_tokenizer.resolve_pre_tokenizer(source_dir, tok, pre))
  else:
    _sentencepiece_vocab(w, tokens, types)
  w.add_token_list(tokens)
  w.add_token_types(types)
  special = gguf.SpecialVocab(source_dir, load_merges=model == "gpt2", n_vocab=cfg.vocab_size)
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


def _sentencepiece_vocab(w: gguf.GGUFWriter, tokens: list[str], types: list) -> None:
  """Gemma's vocabulary as llama.cpp's SentencePiece (`llama`) model, in place in `tokens` and
  `types`: byte tokens typed BYTE, runs of `▁` respelled as the spaces llama.cpp matches, and
  scores that make llama.cpp's highest-score-first merging follow the BPE merge order (the
  earlier a token, the better: our merges are ranked by token position)."""
  scores = []
  for i, (t, k) in enumerate(zip(tokens, types)):
    if k == gguf.TokenType.NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
      types[i] = gguf.TokenType.BYTE
    elif len(t) > 1 and set(t) == {"\u2581"}:
      tokens[i], types[i] = " " * len(t), gguf.TokenType.USER_DEFINED
    scores.append(-float(i) if types[i] == gguf.TokenType.NORMAL else 0.0)
  w.add_token_scores(scores)
  w.add_add_space_prefix(False)


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
  write_tensors(path, cfg, fmts.pop(), _hf_tensors(params, cfg), source_dir, name=name,
                tokenizer_pre=tokenizer_pre)


def write_tensors(path: str, cfg, fmt: Q.QuantFormat, tensors, source_dir: str | None, *,
                  name: str = "minitron-jax", tokenizer_pre: str = "") -> None:
  """Writes HF-named tensors as one GGUF file of `cfg`'s architecture.

  Args:
    path: the `.gguf` file.
    cfg: the config (a `LlamaConfig`, or anything with its fields).
    fmt: the GGUF format the file declares (`general.file_type`).
    tensors: `(hf_name, values, qtype)` in HF layout, as `gguf_tensor` takes them.
    source_dir, name, tokenizer_pre: as for `write_gguf`.
  """
  check_architecture(cfg)
  w = gguf.GGUFWriter(path, architecture(cfg).name)
  _add_architecture(w, cfg, fmt, name)
  if source_dir is not None:
    _add_tokenizer(w, cfg, source_dir, tokenizer_pre)
  for hf_name, x, qtype in tensors:
    w.add_tensor(gguf_tensor_name(hf_name, cfg), gguf_tensor(hf_name, x, cfg, qtype),
                 raw_dtype=qtype)
  if cfg.rope_scaling.rope_type == "llama3":
    w.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
