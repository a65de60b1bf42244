"""llama.cpp's GGUF architectures per HF model type: tensor names and weight conventions.

One row per HF `model_type`, as llama.cpp's `convert_hf_to_gguf.py` writes it (`LlamaModel`,
which also takes `MistralForCausalLM`; `Qwen2Model`; `Qwen3Model`; `Gemma3Model`):

- the GGUF architecture (`general.architecture`, the prefix of its metadata keys);
- the tensor names of one block (`blk.<i>.<name>.weight` / `.bias`) and their HF names;
- whether q/k rows are permuted: only the `llama` architecture is (llama.cpp rotates
  interleaved pairs there and the halves of each head, as HF does, for qwen2/qwen3/gemma3);
- the norm shift: Gemma 3's RMSNorm computes `x * (1 + w)` and its converter stores `w + 1` in
  every `*norm.weight` (input, post-attention, pre/post-feedforward, final and the q/k norms),
  so import subtracts 1 and export adds it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ATTN_MLP = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
}
LLAMA_LAYER = {**_ATTN_MLP, "ffn_norm": "post_attention_layernorm"}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
QWEN3_LAYER = {**LLAMA_LAYER, **_QK_NORMS}
GEMMA3_LAYER = {**_ATTN_MLP, **_QK_NORMS, "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}


@dataclasses.dataclass(frozen=True)
class GgufArch:
  """How one HF model type is written as a llama.cpp GGUF file.

  Attributes:
    name: `general.architecture`.
    hf_architecture: the HF `architectures` entry of a converted directory.
    layer_tensors: GGUF block tensor name -> HF module path inside `model.layers.<i>`.
    permute_qk: q/k projection rows are in llama.cpp's interleaved RoPE order.
    norm_shift: what the file adds to every norm weight.
  """
  name: str
  hf_architecture: str
  layer_tensors: Mapping[str, str]
  permute_qk: bool = False
  norm_shift: float = 0.0

  def gguf_name(self, hf_name: str) -> str:
    """HF tensor name -> llama.cpp's; ValueError if there is none."""
    inverse = {v: k for k, v in GLOBAL_TENSORS.items()}
    if hf_name in inverse:
      return inverse[hf_name]
    m = _HF_LAYER_RE.match(hf_name)
    layer = {v: k for k, v in self.layer_tensors.items()}
    if m and m.group(2) in layer:
      return f"blk.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"HF tensor {hf_name!r} has no llama.cpp {self.name!r} equivalent")

  def hf_name(self, gguf_name: str) -> str:
    """llama.cpp tensor name -> HF's; ValueError if there is none."""
    if gguf_name in GLOBAL_TENSORS:
      return GLOBAL_TENSORS[gguf_name]
    m = _GGUF_LAYER_RE.match(gguf_name)
    if m and m.group(2) in self.layer_tensors:
      return f"model.layers.{m.group(1)}.{self.layer_tensors[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent in "
                     f"architecture {self.name!r}")

  def is_norm(self, hf_name: str) -> bool:
    return hf_name.endswith("norm.weight")


_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")

# HF model_type -> its GGUF form.
ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("llama", "LlamaForCausalLM", LLAMA_LAYER, permute_qk=True),
    "mistral": GgufArch("llama", "MistralForCausalLM", LLAMA_LAYER, permute_qk=True),
    "qwen2": GgufArch("qwen2", "Qwen2ForCausalLM", LLAMA_LAYER),
    "qwen3": GgufArch("qwen3", "Qwen3ForCausalLM", QWEN3_LAYER),
    "gemma3_text": GgufArch("gemma3", "Gemma3ForCausalLM", GEMMA3_LAYER, norm_shift=1.0),
}
# general.architecture -> the HF model_type a GGUF file converts to.
FROM_GGUF = {"llama": "llama", "gemma3": "gemma3_text"}

# Gemma 3 in llama.cpp: one global layer after every five sliding-window ones, and a fixed RoPE
# base for the sliding layers (llama-model.cpp sets both; the converter writes neither).
GEMMA3_SWA_PATTERN = 6
GEMMA3_ROPE_LOCAL_BASE = 10000.0


def for_model_type(model_type: str) -> GgufArch:
  """The GGUF form of HF `model_type`; ValueError naming the supported ones."""
  if model_type not in ARCHS:
    raise ValueError(f"GGUF has no architecture for model_type {model_type!r}; supported: "
                     f"{', '.join(ARCHS)}")
  return ARCHS[model_type]


def gemma3_layer_types(n_layers: int) -> list[str]:
  """llama.cpp's Gemma 3 layer pattern (layer i is global when (i + 1) % 6 == 0)."""
  return ["full_attention" if (i + 1) % GEMMA3_SWA_PATTERN == 0 else "sliding_attention"
          for i in range(n_layers)]
