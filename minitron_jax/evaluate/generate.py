"""Batched generation with a KV cache and one compiled decode step.

Prompts are left-padded to a bucketed length so one prefill compiles per bucket; every new
token goes through the same jitted `decode_step` (cache donated), whatever the step number.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax import model as M
from minitron_jax.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 64
  temperature: float = 0.0  # 0 = greedy
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def bucket(n: int, minimum: int = 16) -> int:
  """Next power of two >= n (and >= minimum), to bound the number of compiled shapes."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def sample(logits_bv: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array
           ) -> jax.Array:
  """Greedy when temperature == 0, else nucleus sampling.

  Temperature and top_p are traced scalars, so one compiled step serves every setting;
  `lax.cond` runs only the branch taken, so greedy decoding never pays for the vocab sort.
  """

  def greedy(_):
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

  def nucleus(key):
    scaled = logits_bv / jnp.maximum(temperature, 1e-6)

    def cut(scaled):
      sorted_bv = jnp.sort(scaled, axis=-1)[:, ::-1]
      probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
      before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv  # mass strictly before each token
      cutoff_b = jnp.min(jnp.where(before_bv < top_p, sorted_bv, jnp.inf), axis=-1,
                         keepdims=True)
      return jnp.where(scaled >= cutoff_b, scaled, -jnp.inf)

    scaled = jax.lax.cond(top_p < 1.0, cut, lambda x: x, scaled)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, nucleus, greedy, key)


def make_steps(cfg: LlamaConfig):
  """(prefill, decode_step) jitted for one config; the cache is donated to both."""

  def prefill(params, tokens_bt, valid_bt, cache, key, temperature, top_p):
    logits_btv, cache = M.forward_cached(params, cfg, tokens_bt, valid_bt, cache)
    return sample(logits_btv[:, -1], key, temperature, top_p), cache

  def decode_step(params, token_b, cache, key, temperature, top_p):
    logits_btv, cache = M.forward_cached(params, cfg, token_b[:, None],
                                         jnp.ones_like(token_b[:, None], bool), cache)
    return sample(logits_btv[:, -1], key, temperature, top_p), cache

  return (jax.jit(prefill, donate_argnums=(3,)), jax.jit(decode_step, donate_argnums=(2,)))


_STEPS: dict[LlamaConfig, tuple] = {}


def steps_for(cfg: LlamaConfig):
  if cfg not in _STEPS:
    _STEPS[cfg] = make_steps(cfg)
  return _STEPS[cfg]


@dataclasses.dataclass
class GenerationResult:
  tokens: list[list[int]]  # new tokens per prompt, EOS excluded
  prefill_seconds: float
  decode_seconds: float
  decode_steps: int

  @property
  def decode_tokens_per_second(self) -> float:
    """Batch tokens generated per second in the decode loop."""
    n = self.decode_steps * len(self.tokens)
    return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def generate(params, cfg: LlamaConfig, prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig = SamplingConfig(), eos_ids: Sequence[int] | None = None,
             stop_at_eos: bool = True) -> GenerationResult:
  """Generates continuations for a batch of tokenised prompts.

  Args:
    params: model params.
    cfg: model config.
    prompts: token ids per prompt (any lengths).
    sampling: decoding settings.
    eos_ids: tokens that end a sequence; default the config's EOS ids.
    stop_at_eos: stop once every row has produced EOS (otherwise run max_new_tokens steps,
      as throughput measurements need).

  Returns:
    A `GenerationResult`.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  eos = np.array(list(cfg.eos_token_ids if eos_ids is None else eos_ids), np.int32)
  b = len(prompts)
  t = bucket(max(len(p) for p in prompts))
  tokens = np.zeros((b, t), np.int32)
  valid = np.zeros((b, t), bool)
  for i, p in enumerate(prompts):
    tokens[i, t - len(p):] = p
    valid[i, t - len(p):] = True
  cache = M.init_cache(cfg, b, bucket(t + sampling.max_new_tokens))
  prefill, decode_step = steps_for(cfg)
  key = jax.random.key(sampling.seed)
  temp, top_p = jnp.float32(sampling.temperature), jnp.float32(sampling.top_p)
  t0 = time.perf_counter()
  key, sub = jax.random.split(key)
  token, cache = prefill(params, tokens, valid, cache, sub, temp, top_p)
  out = [np.asarray(token)]
  t1 = time.perf_counter()
  done = np.isin(out[-1], eos)
  steps = 0
  for _ in range(sampling.max_new_tokens - 1):
    if stop_at_eos and done.all():
      break
    key, sub = jax.random.split(key)
    token, cache = decode_step(params, token, cache, sub, temp, top_p)
    out.append(np.asarray(token))
    done |= np.isin(out[-1], eos)
    steps += 1
  t2 = time.perf_counter()
  seqs = np.stack(out, axis=1)
  result = []
  for row in seqs.tolist():
    cut = next((j for j, tok in enumerate(row) if tok in set(eos.tolist())), len(row))
    result.append(row[:cut] if stop_at_eos else row)
  return GenerationResult(result, t1 - t0, t2 - t1, steps)


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
  """Token ids of a prompt, through the tokenizer's chat template when `chat`."""
  if chat:
    if not getattr(tokenizer, "chat_template", None):
      raise ValueError("--chat: the tokenizer has no chat template")
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                              add_generation_prompt=True, tokenize=True,
                                              return_dict=False))
  ids = tokenizer(text, add_special_tokens=True)["input_ids"]
  return list(ids)


def eos_ids(cfg: LlamaConfig, tokenizer=None) -> tuple[int, ...]:
  """The config's EOS ids plus the tokenizer's, so chat turns end where the model ends them."""
  ids = set(cfg.eos_token_ids)
  if tokenizer is not None and tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  return tuple(sorted(ids))
