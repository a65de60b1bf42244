"""Compatibility with transformers releases that reject valid pruned Llama and Gemma 3 configs.

Width pruning keeps `head_dim` while shrinking `hidden_size`, so `hidden_size` need not be a
multiple of `num_attention_heads` (e.g. hidden 448 with 6 heads of 64). transformers' Llama
computes every projection from `num_attention_heads * head_dim` and handles this, but the
config validator of transformers 5.x raises on it even when `head_dim` is explicit (an open
upstream bug, huggingface/transformers#46211). `allow_explicit_head_dim()` relaxes exactly that
check for configs that set `head_dim`; older transformers releases need nothing. Gemma 3's text
config has the same check; Qwen2, Qwen3 and Mistral configs have none. vLLM (>= 0.24
requires transformers 5) builds the config with `AutoConfig` and so refuses these configs too.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping


def refused_by_transformers5(hf_config: Mapping[str, Any]) -> bool:
  """Whether transformers 5.x's Llama / Gemma 3 config check refuses this `config.json` dict:
  an explicit `head_dim` with `hidden_size` not a multiple of `num_attention_heads` (a valid
  model; Qwen's and Mistral's configs have no such check)."""
  heads, hidden = hf_config.get("num_attention_heads"), hf_config.get("hidden_size")
  strict = hf_config.get("model_type", "llama") in _STRICT_TYPES
  return bool(strict and hf_config.get("head_dim") and heads and hidden and hidden % heads)


# transformers config classes (and their model types) whose validator refuses
# hidden % heads != 0.
_STRICT_CLASSES = ("LlamaConfig", "Gemma3TextConfig")
_STRICT_TYPES = ("llama", "gemma3_text")


@functools.lru_cache(maxsize=None)
def allow_explicit_head_dim() -> bool:
  """Patches `validate_architecture` of transformers' Llama and Gemma 3 text configs; returns
  whether it patched."""
  import transformers

  patched = [_patch(getattr(transformers, name)) for name in _STRICT_CLASSES
             if hasattr(transformers, name)]
  return any(patched)


def _patch(cls) -> bool:
  original = cls.__dict__.get("validate_architecture")
  if original is None:
    return False

  def validate_architecture(self):
    head_dim = getattr(self, "head_dim", None)
    if head_dim and self.hidden_size % self.num_attention_heads:
      if self.num_attention_heads % (self.num_key_value_heads or self.num_attention_heads):
        raise ValueError(f"num_attention_heads ({self.num_attention_heads}) is not a multiple "
                         f"of num_key_value_heads ({self.num_key_value_heads})")
      return None
    return original(self)

  cls.validate_architecture = validate_architecture
  validators = getattr(cls, "__class_validators__", None)
  if isinstance(validators, list):
    cls.__class_validators__ = [validate_architecture if v is original else v
                                for v in validators]
  return True
