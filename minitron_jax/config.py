"""Model configuration: one frozen dataclass, its HF mapping, and presets.

`head_dim` is always explicit: width pruning changes `hidden_size` without touching the
heads, so `hidden_size // num_attention_heads` stops being the head size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: reference runs, needs x64
# How attention runs (see `attention.py`): "auto" picks by backend.
ATTENTION_IMPLS = ("auto", "xla", "splash", "pallas_gpu", "cudnn")
# HF `model_type` -> the `*ForCausalLM` class that reads it. Every family is one forward with
# switches (`LlamaConfig`'s family fields); `gemma3_text` is Gemma 3's text-only model.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM"}
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")


class ConfigError(ValueError):
  """An HF config that this implementation cannot reproduce exactly."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (HF `rope_scaling`); fields unused by a type stay None."""

  rope_type: str = "default"
  factor: float | None = None
  # llama3
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  original_max_position_embeddings: int | None = None
  # yarn
  beta_fast: float | None = None
  beta_slow: float | None = None
  attention_factor: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool | None = None

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ConfigError(f"unsupported rope type {self.rope_type!r}; supported: {ROPE_TYPES}")
    if self.rope_type != "default" and (self.factor is None or self.factor <= 0):
      if not (self.rope_type == "yarn" and self.factor is None):
        raise ConfigError(f"rope type {self.rope_type!r} needs a positive 'factor'")
    need = {"llama3": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "yarn": ("original_max_position_embeddings",)}.get(self.rope_type, ())
    for name in need:
      if getattr(self, name) is None:
        raise ConfigError(f"rope type {self.rope_type!r} needs {name!r}")

  def to_hf(self) -> dict[str, Any] | None:
    if self.rope_type == "default":
      return None
    out = {"rope_type": self.rope_type}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name != "rope_type" and v is not None:
        out[f.name] = v
    return out


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama-family decoder (and the compute dtype used to run it).

  The fields after `pad_token_id` switch the one forward between the families of
  `ARCHITECTURES`; their defaults are Llama's. Qwen2 sets `attention_bias`; Qwen3 `qk_norm`;
  Mistral `sliding_window`; Gemma 3 `norm_plus_one`, `embed_scale` (the teacher's
  sqrt(hidden), kept when pruned), `hidden_act="gelu_pytorch_tanh"`, `sandwich_norms`,
  `qk_norm`, `query_pre_attn_scalar`, `sliding_window` with `layer_types` and
  `rope_local_base_freq`.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  max_position_embeddings: int = 8192
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  model_type: str = "llama"  # HF's model_type (ARCHITECTURES)
  attention_bias: bool = False  # q/k/v projections carry biases (o never does)
  qk_norm: bool = False  # RMSNorm over head_dim on each q and k head, before RoPE
  norm_plus_one: bool = False  # every RMSNorm scales by (1 + w), in float32
  embed_scale: float = 1.0  # embeddings are multiplied by this (in the compute dtype)
  hidden_act: str = "silu"  # the gate's activation (HIDDEN_ACTS)
  sandwich_norms: bool = False  # norms on the attention and MLP outputs, before the residual
  query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (None: head_dim)
  sliding_window: int | None = None  # keys within this many positions (incl. the query's own)
  layer_types: tuple[str, ...] | None = None  # LAYER_TYPES per layer; None: all sliding if
  #   `sliding_window` is set, else all full
  rope_local_base_freq: float | None = None  # RoPE theta of sliding layers (None: rope_theta)
  dtype: str = "float32"  # compute dtype; not part of the checkpoint
  attention_impl: str = "auto"  # attention kernel (ATTENTION_IMPLS); not part of the checkpoint

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.dtype not in DTYPES:
      raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
    if self.dtype == "float64":
      import jax

      if not jax.config.jax_enable_x64:
        raise ConfigError("dtype float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 (or "
                          "jax.config.update('jax_enable_x64', True)) before running")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, "
                        f"got {self.attention_impl!r}")
    if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
      raise ConfigError("rms_norm_eps and rope_theta must be positive")
    self._check_family()

  def _check_family(self):
    if self.model_type not in ARCHITECTURES:
      raise ConfigError(f"model_type {self.model_type!r} is not supported; supported: "
                        f"{sorted(ARCHITECTURES)}")
    if self.hidden_act not in HIDDEN_ACTS:
      raise ConfigError(f"hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}")
    if not self.embed_scale > 0:
      raise ConfigError(f"embed_scale must be positive, got {self.embed_scale!r}")
    for name in ("sliding_window", "query_pre_attn_scalar", "rope_local_base_freq"):
      v = getattr(self, name)
      if v is not None and (isinstance(v, bool) or not v > 0):
        raise ConfigError(f"{name} must be positive or None, got {v!r}")
    if self.sliding_window is not None and not isinstance(self.sliding_window, int):
      raise ConfigError(f"sliding_window must be an integer, got {self.sliding_window!r}")
    if self.layer_types is not None:
      if not isinstance(self.layer_types, tuple):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
      if len(self.layer_types) != self.num_hidden_layers:
        raise ConfigError(f"layer_types has {len(self.layer_types)} entries for "
                          f"num_hidden_layers={self.num_hidden_layers}")
      bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
      if bad:
        raise ConfigError(f"layer_types: unknown type(s) {bad}; known: {LAYER_TYPES}")
    # What each family's HF config can express (`to_hf`).
    if self.model_type == "llama" and (self.sliding_window or self.layer_types):
      raise ConfigError("model_type 'llama' has no sliding_window / layer_types")
    if self.model_type == "mistral" and self.layer_types is not None:
      raise ConfigError("model_type 'mistral' has no layer_types (every layer slides when "
                        "sliding_window is set)")

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer, whether it is a sliding-window (local) layer: its attention sees
    `sliding_window` positions (when set) and its RoPE uses `rope_local_base_freq` (when set)."""
    if self.layer_types is None:
      return (self.sliding_window is not None,) * self.num_hidden_layers
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @property
  def hf_embed_scale(self) -> float:
    """The embedding scale transformers derives for this family: Gemma's sqrt(hidden_size)."""
    return float(self.hidden_size ** 0.5) if self.model_type == "gemma3_text" else 1.0

  @property
  def attn_scale(self) -> float:
    """The attention logits' scale."""
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def keep_layers(self, kept) -> "LlamaConfig":
    """This config with only the layers `kept` (source indices, in order), each keeping its
    kind (`layer_types`)."""
    kept = [int(i) for i in kept]
    types = None if self.layer_types is None else tuple(self.layer_types[i] for i in kept)
    return self.replace(num_hidden_layers=len(kept), layer_types=types)

  def local_rope(self) -> "LlamaConfig":
    """This config with the RoPE of its sliding layers (unscaled, `rope_local_base_freq`)."""
    if self.rope_local_base_freq is None:
      return self
    return self.replace(rope_theta=float(self.rope_local_base_freq), rope_scaling=RopeScaling())

  @property
  def num_groups(self) -> int:
    """Query heads per KV head."""
    return self.num_attention_heads // self.num_key_value_heads

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    """Parameter count, counting a tied embedding once."""
    d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
    n, k = self.num_attention_heads, self.num_key_value_heads
    per_layer = d * h * (2 * n + 2 * k) + 3 * d * f + 2 * d
    per_layer += h * (n + 2 * k) * self.attention_bias + 2 * h * self.qk_norm
    per_layer += 2 * d * self.sandwich_norms
    return self.num_hidden_layers * per_layer + v * d * (1 if self.tie_word_embeddings else 2) + d

  # ---------------------------------------------------------------- HF mapping

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], dtype: str = "float32", source: str = "config.json"
              ) -> "LlamaConfig":
    """Builds a config from an HF `config.json` dict; refuses anything it cannot reproduce."""
    hf = dict(hf)
    where = f"{source}:"
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
      hint = " (Gemma 3's text model is 'gemma3_text')" if model_type == "gemma3" else ""
      raise ConfigError(f"{where} model_type {model_type!r} is not supported (supported: "
                        f"{', '.join(sorted(ARCHITECTURES))}){hint}")
    used, must = _HF_USED | _FAMILY_USED[model_type], {**_HF_MUST, **_FAMILY_MUST[model_type]}
    unknown = sorted(set(hf) - used - _HF_IGNORED - set(must))
    if unknown:
      raise ConfigError(f"{where} unsupported attribute(s) that may change the model: {unknown}")
    for key, ok in must.items():
      if key in hf and hf[key] is not None and hf[key] != ok:
        raise ConfigError(f"{where} {key}={hf[key]!r} is not supported (only {ok!r})")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size"):
      if key not in hf:
        raise ConfigError(f"{where} missing required attribute {key!r}")
    n = hf["num_attention_heads"]
    # transformers' class defaults where a config.json leaves head_dim out
    head_dim = hf.get("head_dim") or {"qwen3": 128, "gemma3_text": 256}.get(
        model_type, hf["hidden_size"] // n)
    eos = hf.get("eos_token_id")
    try:
      family = _family_from_hf(hf, model_type, where)
      return cls(
          vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
          intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
          num_attention_heads=n, num_key_value_heads=hf.get("num_key_value_heads") or n,
          head_dim=head_dim, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
          max_position_embeddings=hf.get("max_position_embeddings", 2048),
          tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type == "gemma3_text")),
          bos_token_id=hf.get("bos_token_id"),
          eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
          pad_token_id=hf.get("pad_token_id"), dtype=dtype, **family)
    except (ConfigError, TypeError) as e:
      msg = str(e)
      raise ConfigError(msg if msg.startswith(where) else f"{where} {msg}") from None

  def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
    """A complete HF `config.json` dict, in the form every transformers version reads.

    The embedding scale is not written: transformers derives Gemma's from `hidden_size`, so a
    config whose `embed_scale` differs is exported through `fold_embed_scale` first.
    """
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    out = {
        "architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type,
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
        "hidden_act": self.hidden_act, "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling.to_hf(),
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings, "attention_dropout": 0.0,
        "bos_token_id": self.bos_token_id, "eos_token_id": eos, "pad_token_id": self.pad_token_id,
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": torch_dtype,
    }
    if self.model_type == "gemma3_text":
      del out["hidden_act"]  # Gemma's config names it hidden_activation
    out.update(_family_to_hf(self))
    return out

  @classmethod
  def from_json_file(cls, path: str | os.PathLike, dtype: str = "float32") -> "LlamaConfig":
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such file (an HF model directory needs config.json)")
    try:
      with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return cls.from_hf(hf, dtype=dtype, source=path)


# Attributes read by from_hf, attributes with no effect on the math, and attributes that
# must hold a given value if present; per family, the attributes it adds.
_HF_USED = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id"})
_HF_MUST = {"mlp_bias": False, "pretraining_tp": 1, "rope_interleaved": False}
_QWEN_WINDOW = frozenset({"use_sliding_window", "sliding_window", "max_window_layers",
                          "layer_types"})
_FAMILY_USED = {
    "llama": frozenset(), "mistral": frozenset({"sliding_window"}),
    "qwen2": _QWEN_WINDOW, "qwen3": _QWEN_WINDOW,
    "gemma3_text": frozenset({"hidden_activation", "hidden_act", "query_pre_attn_scalar",
                              "sliding_window", "layer_types", "rope_local_base_freq",
                              "sliding_window_pattern", "_sliding_window_pattern"}),
}
# Biases on o_proj come with `attention_bias` in Llama, Qwen3 and Gemma 3: not modelled.
_FAMILY_MUST = {
    "llama": {"hidden_act": "silu", "attention_bias": False},
    "mistral": {"hidden_act": "silu"},
    "qwen2": {"hidden_act": "silu"},
    "qwen3": {"hidden_act": "silu", "attention_bias": False},
    "gemma3_text": {"attention_bias": False, "final_logit_softcapping": None,
                    "attn_logit_softcapping": None, "use_bidirectional_attention": False},
}
_HF_IGNORED = frozenset({
    "architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "initializer_range", "use_cache", "attention_dropout", "output_attentions",
    "output_hidden_states", "return_dict", "is_llama_config", "id2label", "label2id",
    "tokenizer_class", "_attn_implementation_autoset", "keys_to_ignore_at_inference",
    "decoder_start_token_id", "sep_token_id", "unk_token_id", "cache_implementation"})


def _family_from_hf(hf: Mapping[str, Any], model_type: str, where: str) -> dict[str, Any]:
  """The family fields (and RoPE) of `LlamaConfig` from an HF config dict."""
  layers = hf["num_hidden_layers"]
  out: dict[str, Any] = {"model_type": model_type}
  if model_type == "gemma3_text":
    return {**out, **_gemma3_from_hf(hf, where)}
  theta, out["rope_scaling"] = _rope_from_hf(hf, where)
  out["rope_theta"] = float(theta)
  if model_type == "mistral":
    out["sliding_window"] = hf.get("sliding_window", 4096)  # MistralConfig's default
  elif model_type in ("qwen2", "qwen3"):
    out["attention_bias"] = model_type == "qwen2"
    out["qk_norm"] = model_type == "qwen3"
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= hf.get("max_window_layers", 28)
        else "full_attention" for i in range(layers)]
    if window is not None and "sliding_attention" in types:  # else every layer is full
      out["sliding_window"], out["layer_types"] = window, tuple(types)
  return out


def _gemma3_from_hf(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  if hf.get("hidden_act") not in (None, act):
    raise ConfigError(f"{where} hidden_act={hf['hidden_act']!r} disagrees with "
                      f"hidden_activation={act!r}")
  layers = hf["num_hidden_layers"]
  pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
  types = hf.get("layer_types") or [
      "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
  params = hf.get("rope_parameters") or {}
  if "full_attention" in params or "sliding_attention" in params:  # transformers 5's layout
    unknown = sorted(set(params) - set(LAYER_TYPES))
    if unknown:
      raise ConfigError(f"{where} rope_parameters: unknown layer type(s) {unknown}")
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    full.setdefault("rope_theta", hf.get("rope_theta") or 1e6)
    local.setdefault("rope_theta", hf.get("rope_local_base_freq") or 1e4)
    theta, rope = _rope_from_hf({"rope_parameters": full, "rope_scaling": hf.get("rope_scaling")},
                                where)
    local_theta, local_rope = _rope_from_hf({"rope_parameters": local}, where)
  else:
    theta, rope = _rope_from_hf({**hf, "rope_theta": hf.get("rope_theta") or 1e6}, where)
    local_theta, local_rope = hf.get("rope_local_base_freq") or 1e4, RopeScaling()
  if local_rope.rope_type != "default":
    raise ConfigError(f"{where} rope type {local_rope.rope_type!r} on sliding layers is not "
                      "supported (only 'default')")
  return {"hidden_act": act, "norm_plus_one": True, "qk_norm": True, "sandwich_norms": True,
          "embed_scale": float(hf["hidden_size"] ** 0.5),
          "query_pre_attn_scalar": float(hf.get("query_pre_attn_scalar", 256)),
          "sliding_window": hf.get("sliding_window", 4096), "layer_types": tuple(types),
          "rope_theta": float(theta), "rope_scaling": rope,
          "rope_local_base_freq": float(local_theta)}


def _int_if_whole(x: float) -> float | int:
  """transformers types some scalars as int (Gemma's query_pre_attn_scalar)."""
  return int(x) if float(x).is_integer() else x


def _family_to_hf(cfg: "LlamaConfig") -> dict[str, Any]:
  """The family attributes of `cfg`'s HF config.json."""
  t = cfg.model_type
  if t == "llama":
    return {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
  if t == "mistral":
    return {"sliding_window": cfg.sliding_window}
  if t in ("qwen2", "qwen3"):
    out = {"use_sliding_window": cfg.sliding_window is not None,
           "sliding_window": cfg.sliding_window, "max_window_layers": cfg.num_hidden_layers,
           "layer_types": list(cfg.layer_types or ["full_attention"] * cfg.num_hidden_layers)}
    if t == "qwen3":
      out["attention_bias"] = False
    return out
  types = ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers]
  return {"hidden_activation": cfg.hidden_act,
          "query_pre_attn_scalar": _int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
          "sliding_window": cfg.sliding_window, "layer_types": types,
          "rope_local_base_freq": cfg.rope_local_base_freq or cfg.rope_theta,
          "attention_bias": False, "final_logit_softcapping": None,
          "attn_logit_softcapping": None, "use_bidirectional_attention": False}


def _rope_from_hf(hf: Mapping[str, Any], where: str) -> tuple[float, RopeScaling]:
  """Reads RoPE settings in both the legacy (`rope_theta` + `rope_scaling`) and the newer
  (`rope_parameters`) layouts of transformers."""
  params = dict(hf.get("rope_parameters") or {})
  legacy = dict(hf.get("rope_scaling") or {})
  theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
  params = {**params, **legacy}  # transformers lets a legacy rope_scaling win, so do we
  rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
  params.pop("type", None)
  params.pop("partial_rotary_factor", 1.0) == 1.0 or _fail(where, "partial_rotary_factor != 1")
  if rope_type == "default":
    params.pop("factor", None)
  known = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
  extra = sorted(set(params) - known)
  if extra:
    raise ConfigError(f"{where} unsupported rope setting(s) {extra} for rope type {rope_type!r}")
  if rope_type not in ROPE_TYPES:
    raise ConfigError(f"{where} unsupported rope type {rope_type!r}; supported: {ROPE_TYPES}")
  try:
    return float(theta), RopeScaling(rope_type=rope_type, **params)
  except ConfigError as e:
    raise ConfigError(f"{where} {e}") from None


def _fail(where: str, what: str):
  raise ConfigError(f"{where} {what} is not supported")


# ------------------------------------------------------------------------------ presets

LLAMA3_ROPE = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)

PRESETS: dict[str, LlamaConfig] = {
    "llama3.1-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=128001),
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "tiny": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2),
}
PRESETS["minitron-4b-width"] = PRESETS["llama3.1-8b"].replace(
    hidden_size=3072, intermediate_size=9216)
PRESETS["minitron-4b-depth"] = PRESETS["llama3.1-8b"].replace(num_hidden_layers=16)
# The other families' small members, as their HF config.json describe them.
PRESETS["qwen2.5-0.5b"] = LlamaConfig(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
    rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151643, model_type="qwen2", attention_bias=True)
PRESETS["qwen3-0.6b"] = LlamaConfig(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
    rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151645, model_type="qwen3", qk_norm=True)
PRESETS["mistral-7b-v0.1"] = LlamaConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2,
    model_type="mistral", sliding_window=4096)
PRESETS["gemma3-270m"] = LlamaConfig(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6,
    rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
    bos_token_id=2, eos_token_id=1, pad_token_id=0, model_type="gemma3_text", qk_norm=True,
    norm_plus_one=True, embed_scale=640 ** 0.5, hidden_act="gelu_pytorch_tanh",
    sandwich_norms=True, query_pre_attn_scalar=256.0, sliding_window=512,
    layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                      for i in range(18)),
    rope_local_base_freq=10000.0)
# SmolLM2's vocabulary and RoPE on a body small enough for a recipe smoke test in minutes.
PRESETS["smollm2-tiny"] = PRESETS["smollm2-135m"].replace(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=2048)


def preset(name: str, **overrides) -> LlamaConfig:
  if name not in PRESETS:
    raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


def rope_inv_freq_and_scale(cfg: LlamaConfig):
  """Inverse frequencies (numpy float32, head_dim/2) and the cos/sin scale, as HF computes them."""
  import numpy as np

  dim = cfg.head_dim
  base = cfg.rope_theta
  inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  inv_freq = inv_freq.astype(np.float32)
  r = cfg.rope_scaling
  if r.rope_type == "default":
    return inv_freq, 1.0
  if r.rope_type == "linear":
    return (inv_freq / np.float32(r.factor)).astype(np.float32), 1.0
  if r.rope_type == "llama3":
    old = r.original_max_position_embeddings
    low_wl, high_wl = old / r.low_freq_factor, old / r.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    out = np.where(wavelen > low_wl, inv_freq / r.factor, inv_freq).astype(np.float32)
    smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * out / r.factor + smooth * out
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, out).astype(np.float32), 1.0
  # yarn
  factor = r.factor if r.factor is not None else (
      cfg.max_position_embeddings / r.original_max_position_embeddings)

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attn = r.attention_factor
  if attn is None:
    attn = (mscale(factor, r.mscale) / mscale(factor, r.mscale_all_dim)
            if r.mscale and r.mscale_all_dim else mscale(factor))
  beta_fast, beta_slow = r.beta_fast or 32, r.beta_slow or 1

  def corr_dim(rot):
    return (dim * math.log(r.original_max_position_embeddings / (rot * 2 * math.pi))) / (
        2 * math.log(base))

  low, high = corr_dim(beta_fast), corr_dim(beta_slow)
  if r.truncate is None or r.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  pos_freqs = (base ** (np.arange(0, dim, 2).astype(np.float32) / dim)).astype(np.float32)
  extra_factor = (1 - ramp).astype(np.float32)
  inv = (1.0 / (factor * pos_freqs)) * (1 - extra_factor) + (1.0 / pos_freqs) * extra_factor
  return inv.astype(np.float32), float(attn)


def expand_ranges(spec: str, what: str = "layer list") -> list[int]:
  """`"0,1,4-7"` -> [0, 1, 4, 5, 6, 7], in the order given."""
  out: list[int] = []
  for part in filter(None, (p.strip() for p in str(spec).split(","))):
    lo, sep, hi = part.partition("-")
    try:
      a, b = int(lo), int(hi) if sep else int(lo)
    except ValueError:
      raise ValueError(f"{what} {spec!r}: {part!r} is not an index or a range a-b") from None
    if b < a:
      raise ValueError(f"{what} {spec!r}: empty range {part!r}")
    out.extend(range(a, b + 1))
  if not out:
    raise ValueError(f"{what} {spec!r} is empty")
  return out


def parse_layer_list(spec: str, num_layers: int | None = None) -> tuple[int, ...]:
  """`"16-31"` / `"1,3,5-7"` -> sorted unique layer indices, checked against `num_layers`."""
  out = set(expand_ranges(spec))
  bad = sorted(i for i in out if num_layers is not None and not 0 <= i < num_layers)
  if bad:
    raise ValueError(f"layer list {spec!r}: layer(s) {bad} out of range [0, {num_layers - 1}]")
  return tuple(sorted(out))
