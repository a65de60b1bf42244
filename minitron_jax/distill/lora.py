"""LoRA recovery (LLM-Pruner's recovery step): train low-rank adapters on a frozen base.

Each targeted linear leaf `W` (our layout `(L, *in, *out)`, from the axis table) gets an
adapter `a: (L, *in, r)` and `b: (L, r, *out)`; the model reads `W + (alpha / r) * a @ b`.
`b` starts at zero, so the first step sees exactly the base model. Only the adapters are
trained (and held by the optimizer); the base stays frozen in the train state, in the compute
dtype or, QLoRA-style, as INT8/INT4 `QuantizedArray` leaves that the merge dequantizes.

The merge is a pure function over param dicts, used three ways: inside the train step (the
compute-dtype model the forward pass reads), by the held-out evaluation, and in float32 for
the export, where the merged checkpoint is an ordinary HF directory. `peft_tensors` gives the
same adapters as a PEFT LoRA adapter (`lora_A: (r, in)`, `lora_B: (out, r)`, HF names).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from minitron_jax import axes, sharding
from minitron_jax.config import LlamaConfig
from minitron_jax.settings import SettingError

# Adapter target -> the layer leaf it adapts (the names of the axis table).
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# INT weight-only formats the frozen base may be stored in (QLoRA); names of `quantize.formats`.
BASE_FORMATS = ("int8", "int4", "int4_asym")
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which leaves get adapters, their rank and scale, and how the frozen base is stored.

  Attributes:
    rank: adapter rank r (> 0).
    targets: layer leaves to adapt, a subset of `TARGETS`.
    alpha: the adapters' output is scaled by alpha / r; None = r (scale 1).
    base_format: "" = the frozen base in the compute dtype; an INT format of `BASE_FORMATS` =
      the base's linear weights quantized to it (QLoRA), norms and embeddings in the compute
      dtype.
    group_size: INT4 group size of `base_format`.
    peft: also write the adapters as a PEFT adapter directory (`<output_dir>/peft`).
  """

  rank: int = 8
  targets: tuple[str, ...] = TARGETS
  alpha: float | None = None
  base_format: str = ""
  group_size: int = 128
  peft: bool = False

  @property
  def scale(self) -> float:
    return float(self.alpha if self.alpha is not None else self.rank) / self.rank

  def validate(self, prefix: str = "lora.") -> None:
    if not isinstance(self.rank, int) or self.rank < 1:
      raise SettingError(prefix + "rank", f"{{name}} must be an integer >= 1, got {self.rank!r}")
    bad = [t for t in self.targets if t not in TARGETS]
    if bad or not self.targets or len(set(self.targets)) != len(self.targets):
      raise SettingError(prefix + "targets", f"{{name}} must be distinct names of {TARGETS}, "
                         f"got {tuple(self.targets)!r}")
    if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
      raise SettingError(prefix + "alpha", f"{{name}} must be > 0, got {self.alpha!r}")
    if self.base_format not in ("",) + BASE_FORMATS:
      raise SettingError(prefix + "base_format", f"{{name}} must be empty or one of "
                         f"{BASE_FORMATS}, got {self.base_format!r}")
    if not isinstance(self.group_size, int) or self.group_size < 2:
      raise SettingError(prefix + "group_size", f"{{name}} must be an integer >= 2, got "
                         f"{self.group_size!r}")


def parse_targets(text: str) -> tuple[str, ...]:
  """"q,k,v" -> ("q", "k", "v") (checked by `LoraSpec.validate`)."""
  return tuple(t.strip() for t in text.split(",") if t.strip())


def _spec(target: str) -> axes.ParamSpec:
  return next(s for s in axes.PARAM_SPECS if s.path == ("layers", target))


def split_axes(target: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(input axes, output axes) of a target leaf in our layout `(layers, *in, *out)`."""
  spec = _spec(target)
  out_axes, in_axes = spec.hf_axes
  if spec.axes[1:] != in_axes + out_axes:
    raise ValueError(f"{spec.name}: layout {spec.axes} is not (layers, *in, *out)")
  return in_axes, out_axes


def init_adapters(key: jax.Array, cfg: LlamaConfig, spec: LoraSpec) -> dict:
  """Fresh float32 adapters `{"layers": {target: {"a", "b"}}}`: `a` uniform in
  +-1/sqrt(fan_in) (PEFT's Kaiming-uniform default), `b` zero."""
  sizes = axes.axis_sizes(cfg)
  out = {}
  for k, target in zip(jax.random.split(key, len(spec.targets)), spec.targets):
    in_axes, out_axes = split_axes(target)
    in_dims, out_dims = [sizes[a] for a in in_axes], [sizes[a] for a in out_axes]
    bound = 1.0 / math.sqrt(math.prod(in_dims))
    a = jax.random.uniform(k, (cfg.num_hidden_layers, *in_dims, spec.rank), jnp.float32,
                           -bound, bound)
    out[target] = {"a": a, "b": jnp.zeros((cfg.num_hidden_layers, spec.rank, *out_dims),
                                          jnp.float32)}
  return {"layers": out}


def delta(adapter: dict, scale: float, dtype=jnp.float32) -> jax.Array:
  """(alpha / r) * a @ b of one target, in the leaf's layout `(L, *in, *out)`."""
  a, b = adapter["a"].astype(dtype), adapter["b"].astype(dtype)
  lead, rank = a.shape[0], a.shape[-1]
  m = jnp.einsum("LIR,LRO->LIO", a.reshape(lead, -1, rank), b.reshape(lead, rank, -1))
  return (m * jnp.asarray(scale, dtype)).reshape(a.shape[:-1] + b.shape[2:])


def _dense(leaf, dtype):
  return leaf.dequantize(dtype) if hasattr(leaf, "dequantize") else jnp.asarray(leaf, dtype)


def merge(base: dict, adapters: dict, scale: float, dtype=jnp.float32) -> dict:
  """The model params the forward pass reads: every adapted leaf `W + scale * a @ b` in
  `dtype` (a quantized base leaf is dequantized first); the other leaves as they are."""
  layers = dict(base["layers"])
  for target, adapter in adapters["layers"].items():
    layers[target] = _dense(layers[target], dtype) + delta(adapter, scale, dtype)
  return {**base, "layers": layers}


def merged_host(base: dict, adapters: dict, scale: float) -> dict:
  """Float32 host copy of the merged model (the export): every leaf float32, adapted leaves
  `W + scale * a @ b` computed in float32."""
  merged = merge(base, adapters, scale, jnp.float32)
  return jax.tree_util.tree_map(lambda x: np.asarray(_dense(x, jnp.float32)), merged,
                                is_leaf=lambda x: hasattr(x, "dequantize"))


def frozen_base(params: dict, dtype) -> dict:
  """The frozen base as the train state holds it: quantized leaves as they are, the rest in
  the compute `dtype` (the forward pass reads every weight in that dtype anyway)."""
  return jax.tree_util.tree_map(
      lambda x: x if hasattr(x, "dequantize") else jnp.asarray(x, dtype), params,
      is_leaf=lambda x: hasattr(x, "dequantize"))


def adapter_shardings(adapters: dict, mesh: Mesh) -> dict:
  """`a` sharded as its leaf's input axes, `b` as its output axes; the rank replicated."""
  out = {}
  for target, ab in adapters["layers"].items():
    in_axes, out_axes = split_axes(target)
    names = {"a": (axes.LAYERS, *in_axes, None), "b": (axes.LAYERS, None, *out_axes)}
    out[target] = {k: NamedSharding(mesh, sharding.activation_spec(ab[k].shape, names[k], mesh))
                   for k in ab}
  return {"layers": out}


def base_shardings(base: dict, cfg: LlamaConfig, mesh: Mesh) -> dict:
  """The frozen base by the logical-axis rules; quantized leaves replicated (as
  `sharding.shard_params` places them)."""
  rep = sharding.replicated(mesh)
  dense = sharding.param_shardings(cfg, mesh, params=base)
  return jax.tree_util.tree_map(
      lambda leaf, s: jax.tree_util.tree_map(lambda _: rep, leaf)
      if hasattr(leaf, "dequantize") else s, base, dense,
      is_leaf=lambda x: hasattr(x, "dequantize"))


def export(adapters: dict, *, base: dict, spec: LoraSpec, output_dir: str, base_model: str,
           write: bool = True) -> dict:
  """Host adapters -> the merged float32 model to export; also writes the PEFT adapter
  directory `output_dir/peft` (for `base_model`) when `spec.peft` and `write` (process 0)."""
  if write and spec.peft:
    write_peft(os.path.join(output_dir, "peft"), adapters, spec, base_model)
  return merged_host(base, adapters, spec.scale)


# ---------------------------------------------------------------------------- PEFT


def peft_name(target: str, layer: int, which: str) -> str:
  module = _spec(target).hf_name.format(i=layer).removesuffix(".weight")
  return f"base_model.model.{module}.lora_{which}.weight"


def peft_tensors(adapters: dict) -> dict[str, np.ndarray]:
  """HF name -> float32 PEFT tensor: `lora_A (r, in)`, `lora_B (out, r)`, with the merged
  in/out axes in HF's row-major order (the axis table's `hf_axes`)."""
  out = {}
  for target, ab in adapters["layers"].items():
    a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
    for i in range(a.shape[0]):
      out[peft_name(target, i, "A")] = np.ascontiguousarray(a[i].reshape(-1, a.shape[-1]).T)
      out[peft_name(target, i, "B")] = np.ascontiguousarray(b[i].reshape(b.shape[1], -1).T)
  return out


def peft_config(spec: LoraSpec, base_model: str) -> dict:
  """PEFT's `adapter_config.json` of these adapters."""
  modules = [_spec(t).hf_name.rsplit(".", 2)[-2] for t in spec.targets]
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
          "r": spec.rank, "lora_alpha": float(spec.alpha if spec.alpha is not None
                                              else spec.rank),
          "target_modules": modules, "lora_dropout": 0.0, "bias": "none",
          "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
          "inference_mode": True, "modules_to_save": None}


def write_peft(out_dir: str, adapters: dict, spec: LoraSpec, base_model: str) -> None:
  """Writes a PEFT adapter directory (safetensors + config) atomically."""
  from minitron_jax.io import files, safetensors

  tensors = peft_tensors(adapters)
  with files.atomic_output_dir(out_dir, overwrite=True) as tmp:
    safetensors.write(os.path.join(tmp, PEFT_WEIGHTS),
                      [(k, v.shape, v.dtype, lambda v=v: v) for k, v in sorted(tensors.items())],
                      metadata={"format": "pt"})
    with open(os.path.join(tmp, PEFT_CONFIG), "w") as f:
      json.dump(peft_config(spec, base_model), f, indent=2)
