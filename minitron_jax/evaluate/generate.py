"""Batched generation with a KV cache and a compiled on-device decode loop.

Prompts are left-padded to a bucketed length so one prefill compiles per bucket. Decoding runs
as a `lax.while_loop` on device (cache donated, updated in place), which stops by itself once
every row has produced EOS; the host only looks in when attention's span grows to the next
power-of-two bucket of the filled cache length, so a generation compiles a handful of decode
shapes and syncs a handful of times, not once per token.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh, NamedSharding

from minitron_jax import model as M, sharding
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


# Nucleus sampling looks at the top this-many logits first: a full sort of a 49k-128k vocabulary
# costs about a second per 64 rows on a CPU, top-k a hundredth of that.
NUCLEUS_TOP_K = 1024


def nucleus_keep(scaled_bv: jax.Array, top_p: jax.Array) -> jax.Array:
  """Mask of the tokens nucleus sampling keeps, by a full sort (the reference): a token is kept
  when the probability mass of the tokens sorted before it is below `top_p`; ties of the last
  kept value are kept too."""
  sorted_bv = jnp.sort(scaled_bv, axis=-1)[:, ::-1]
  return scaled_bv >= _cutoff(sorted_bv, jax.nn.softmax(sorted_bv, axis=-1), top_p)


def _cutoff(desc_bk: jax.Array, probs_bk: jax.Array, top_p: jax.Array) -> jax.Array:
  """(B, 1) smallest kept logit, from logits in descending order and their probabilities: the
  last one whose predecessors' mass is below `top_p`."""
  before_bk = jnp.cumsum(probs_bk, axis=-1) - probs_bk  # mass strictly before each token
  return jnp.min(jnp.where(before_bk < top_p, desc_bk, jnp.inf), axis=-1, keepdims=True)


def nucleus_sample(key: jax.Array, scaled_bv: jax.Array, top_p: jax.Array,
                   k: int = NUCLEUS_TOP_K) -> jax.Array:
  """One draw per row from the nucleus of `scaled_bv`, through the top `k` logits when every
  row's nucleus lies strictly inside them (then the kept set equals `nucleus_keep`'s), else
  through the full sort."""
  v = scaled_bv.shape[-1]
  k = min(k, v)
  top_bk, ids_bk = jax.lax.top_k(scaled_bv, k)
  probs_bk = jnp.exp(top_bk - jax.nn.logsumexp(scaled_bv, axis=-1, keepdims=True))
  cutoff_b1 = _cutoff(top_bk, probs_bk, top_p)

  def from_top(key):
    j_b = jax.random.categorical(key, jnp.where(top_bk >= cutoff_b1, top_bk, -jnp.inf), axis=-1)
    return jnp.take_along_axis(ids_bk, j_b[:, None], axis=-1)[:, 0]

  def from_all(key):
    return jax.random.categorical(
        key, jnp.where(nucleus_keep(scaled_bv, top_p), scaled_bv, -jnp.inf), axis=-1)

  # Strictly above the k-th value: no token outside the top k ties with the cutoff.
  inside = jnp.all(cutoff_b1[:, 0] > top_bk[:, -1]) | (k == v)
  return jax.lax.cond(inside, from_top, from_all, key).astype(jnp.int32)


def sample(logits_bv: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array
           ) -> jax.Array:
  """Greedy when temperature == 0, else nucleus sampling.

  Temperature and top_p are traced scalars, so one compiled step serves every setting;
  `lax.cond` runs only the branch taken, so greedy decoding never pays for the nucleus.
  """

  def greedy(_):
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

  def nucleus(key):
    scaled = logits_bv / jnp.maximum(temperature, 1e-6)
    return jax.lax.cond(
        top_p < 1.0, lambda key: nucleus_sample(key, scaled, top_p),
        lambda key: jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32), key)

  return jax.lax.cond(temperature > 0, nucleus, greedy, key)


def _is_eos(token_b: jax.Array, eos_e: jax.Array) -> jax.Array:
  return jnp.any(token_b[:, None] == eos_e[None, :], axis=-1)


def state_shardings(mesh: Mesh) -> dict:
  """Decode-state layout on `mesh`: rows over the batch axes, KV heads over `tensor` (as the
  k/v projections), the rest replicated."""
  def named(*names):
    return NamedSharding(mesh, sharding.logical_to_spec(names, mesh=mesh))
  cache = {"k": named(None, "batch", "seq", "kv_heads", "head_dim"),
           "v": named(None, "batch", "seq", "kv_heads", "head_dim"),
           "valid": named("batch", "seq"), "index": named(), "next_position": named("batch")}
  return {"token": named("batch"), "cache": cache, "key": named(), "out": named("batch", None),
          "n": named(), "done": named("batch")}


def make_steps(cfg: LlamaConfig, mesh: Mesh | None = None):
  """(prefill, decode) jitted for one config; both donate the decode state.

  The decode state is a dict: `token` (B,) the last sampled token, `cache`, `key`, `out`
  (B, W) the sampled tokens so far, `n` how many of them, `done` (B,) whether a row has
  produced EOS. On a `mesh` the state keeps the layout of `state_shardings`.
  """

  def prefill(params, tokens_bt, valid_bt, state, key, temperature, top_p, eos_e):
    # A fresh cache (index 0): the prompt bucket covers every filled slot.
    logits_btv, cache = M.forward_cached(params, cfg, tokens_bt, valid_bt, state["cache"],
                                         attend_len=tokens_bt.shape[1])
    token = sample(logits_btv[:, -1], key, temperature, top_p)
    return {**state, "token": token, "cache": cache, "n": jnp.ones((), jnp.int32),
            "out": state["out"].at[:, 0].set(token), "done": _is_eos(token, eos_e)}

  def decode(params, state, max_steps, temperature, top_p, eos_e, stop_at_eos, *, attend_len):
    """At most `max_steps` tokens (all within `attend_len` cache slots); stops as soon as
    every row is done when `stop_at_eos`."""

    def cond(st):
      return (st["i"] < max_steps) & ~(stop_at_eos & jnp.all(st["done"]))

    def body(st):
      key, sub = jax.random.split(st["key"])
      token_b = st["token"]
      logits_btv, cache = M.forward_cached(params, cfg, token_b[:, None],
                                           jnp.ones_like(token_b[:, None], bool), st["cache"],
                                           attend_len=attend_len)
      token = sample(logits_btv[:, -1], sub, temperature, top_p)
      out = jax.lax.dynamic_update_slice_in_dim(st["out"], token[:, None], st["n"], axis=1)
      return {"token": token, "cache": cache, "key": key, "out": out, "n": st["n"] + 1,
              "done": st["done"] | _is_eos(token, eos_e), "i": st["i"] + 1}

    st = jax.lax.while_loop(cond, body, {**state, "i": jnp.zeros((), jnp.int32)})
    del st["i"]
    return st

  if mesh is None:
    return (jax.jit(prefill, donate_argnums=(3,)),
            jax.jit(decode, donate_argnums=(1,), static_argnames=("attend_len",)))
  sh = state_shardings(mesh)
  no_key = {k: v for k, v in sh.items() if k != "key"}  # prefill's state has no key yet
  return (sharding.MeshJit(prefill, mesh, donate_argnums=(3,), out_shardings=no_key),
          sharding.MeshJit(decode, mesh, donate_argnums=(1,), static_argnames=("attend_len",),
                           out_shardings=sh))


_STEPS: dict[tuple, tuple] = {}


def steps_for(cfg: LlamaConfig, mesh: Mesh | None = None):
  if (cfg, mesh) not in _STEPS:
    _STEPS[cfg, mesh] = make_steps(cfg, mesh)
  return _STEPS[cfg, mesh]


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


def _every_row(out, mesh: Mesh | None) -> np.ndarray:
  if mesh is not None:  # every host reads every row
    out = jax.jit(lambda x: x, out_shardings=sharding.replicated(mesh))(out)
  return np.asarray(out)


def generate(params, cfg: LlamaConfig, prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig = SamplingConfig(), eos_ids: Sequence[int] | None = None,
             stop_at_eos: bool = True, mesh: Mesh | None = None,
             stop_when: Callable[[list[list[int]]], bool] | None = None,
             check_every: int = 8) -> GenerationResult:
  """Generates continuations for a batch of tokenised prompts.

  Args:
    params: model params.
    cfg: model config.
    prompts: token ids per prompt (any lengths).
    sampling: decoding settings.
    eos_ids: tokens that end a sequence; default the config's EOS ids.
    stop_at_eos: stop once every row has produced EOS (otherwise run max_new_tokens steps,
      as throughput measurements need).
    stop_when: called with every row's tokens so far (EOS included) every `check_every`
      decode steps; True ends generation there (e.g. every row has produced a stop string).
      Rows are independent, so each row's tokens are a prefix of what a longer run gives.
    check_every: decode steps between `stop_when` calls.
    mesh: shard params by the logical-axis rules and the prompts' rows (padded with copies
      of the first prompt to a multiple of the batch shards) and KV cache over the batch
      axes; every host passes the same prompts and gets every row's tokens.

  Returns:
    A `GenerationResult`.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  eos = sorted(set(int(e) for e in (cfg.eos_token_ids if eos_ids is None else eos_ids)))
  # Padded with -1 (never sampled) to a bucketed length: one compile serves any EOS set.
  eos_e = np.full(bucket(len(eos), minimum=4), -1, np.int32)
  eos_e[:len(eos)] = eos
  n_prompts = len(prompts)
  prompts = list(prompts)
  prompts += [prompts[0]] * (sharding.padded_rows(n_prompts, mesh) - n_prompts)
  b = len(prompts)
  t = bucket(max(len(p) for p in prompts))
  tokens = np.zeros((b, t), np.int32)
  valid = np.zeros((b, t), bool)
  for i, p in enumerate(prompts):
    tokens[i, t - len(p):] = p
    valid[i, t - len(p):] = True
  max_new = sampling.max_new_tokens
  state = {"token": jnp.zeros((b,), jnp.int32),
           "cache": M.init_cache(cfg, b, bucket(t + max_new)),
           "out": jnp.zeros((b, bucket(max_new)), jnp.int32), "n": jnp.zeros((), jnp.int32),
           "done": jnp.zeros((b,), bool)}
  if mesh is not None:
    params = sharding.shard_params(params, cfg, mesh)
    state = sharding.put_global(jax.device_get(state), {
        k: v for k, v in state_shardings(mesh).items() if k in state})
    tokens, valid = sharding.shard_rows(tokens, mesh), sharding.shard_rows(valid, mesh)
  prefill, decode = steps_for(cfg, mesh)
  key = jax.random.key(sampling.seed)
  temp, top_p = jnp.float32(sampling.temperature), jnp.float32(sampling.top_p)
  stop = jnp.bool_(stop_at_eos)
  t0 = time.perf_counter()
  key, sub = jax.random.split(key)
  state = prefill(params, tokens, valid, state, sub, temp, top_p, eos_e)
  state["key"] = key
  state["token"].block_until_ready()
  t1 = time.perf_counter()
  steps = 0  # decode steps run so far; the cache holds t + steps tokens
  while steps < max_new - 1:
    attend = bucket(t + steps + 1)  # covers the slot the next token writes
    want = min(attend - t - steps, max_new - 1 - steps)
    if stop_when is not None:
      want = min(want, check_every)
    state = decode(params, state, jnp.int32(want), temp, top_p, eos_e, stop, attend_len=attend)
    ran = int(state["n"]) - 1 - steps  # the one host sync per bucket
    steps += ran
    if ran < want:  # stopped on device: every row has produced EOS
      break
    if stop_when is not None and stop_when(
        _every_row(state["out"], mesh)[:n_prompts, :steps + 1].tolist()):
      break
  seqs = _every_row(state["out"], mesh)[:n_prompts, :steps + 1]
  t2 = time.perf_counter()
  eos_set = set(eos)
  result = []
  for row in seqs.tolist():
    cut = next((j for j, tok in enumerate(row) if tok in eos_set), len(row))
    result.append(row[:cut] if stop_at_eos else row)
  return GenerationResult(result, t1 - t0, t2 - t1, steps)


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
  """Token ids of a prompt, through the tokenizer's chat template when `chat`."""
  if chat:
    if not getattr(tokenizer, "chat_template", None):
      raise ValueError("chat prompts need a chat template, and the tokenizer has none")
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


def decode_speed(params, cfg: LlamaConfig, prompts: Sequence[Sequence[int]], new_tokens: int,
                 repeats: int = 1, mesh: Mesh | None = None) -> float:
  """Decode tokens/s of greedy generation (no early stop), best of `repeats` timed runs after
  one untimed run that compiles."""
  sampling = SamplingConfig(max_new_tokens=new_tokens)
  generate(params, cfg, prompts, sampling, stop_at_eos=False, mesh=mesh)
  return max(generate(params, cfg, prompts, sampling, stop_at_eos=False,
                      mesh=mesh).decode_tokens_per_second
             for _ in range(repeats))
