"""Architecture search under a budget, as in the Minitron report: enumerate, account, score, rank.

A user states a budget (total parameters, or memory: weights at the export dtype plus the KV
cache of `kv_tokens` tokens); the search lists every shape the teacher can be pruned to that
meets it, scores the ones closest to the budget one-shot from importance computed once, and
leaves the short distillation of the best few to the caller (`recipe/search.py`).

Search space (every layer keeps the same shape):

- hidden and MLP widths: multiples of a granule from `granule()` (128 for sizes >= 2048 that
  128 divides, else the largest of 64, 32, 16, 8 that divides the teacher's size; matrix units
  and GEMM tiles run best on such sizes) or of `multiple` when given, cut at most
  `max_width_cut` of the teacher's; the teacher's own size is always a choice. Hidden sizes must
  be a multiple of the candidate's query-head count, because transformers 5 and vLLM refuse
  other Llama configs (`prune.run.compat_warnings`).
- attention: KV groups (1..K) and query heads per group (1..G), so grouped-query attention stays
  valid; the query-head count is cut at most `max_width_cut`.
- depth: at least `(1 - max_depth_cut) * L` layers.

Budget: a candidate meets `target_params` when `(1 - slack) * target <= params <= target`, and
`target_memory_gb` when `memory_bytes <= target * 1e9` (GB = 10^9 bytes). Parameters count a
tied embedding once (`LlamaConfig.num_params`).

A `Candidate` keeps the MLP width per layer (`mlp_widths`), so per-layer widths can be added
later without changing the accounting; today every layer shares one width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from minitron_jax.config import LlamaConfig
from minitron_jax.prune import importance as I
from minitron_jax.prune import slicing
from minitron_jax.settings import SettingError

# Bytes per weight / per KV-cache entry for the export dtypes the memory target understands.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


@dataclasses.dataclass(frozen=True, order=True)
class Candidate:
  """One pruned shape; `mlp_widths` has one entry per kept layer."""

  hidden_size: int
  mlp_widths: tuple[int, ...]
  heads_per_group: int
  num_kv_heads: int

  @property
  def num_layers(self) -> int:
    return len(self.mlp_widths)

  @property
  def num_heads(self) -> int:
    return self.heads_per_group * self.num_kv_heads

  @property
  def intermediate_size(self) -> int:
    if len(set(self.mlp_widths)) != 1:
      raise NotImplementedError("per-layer MLP widths are not supported by pruning yet")
    return self.mlp_widths[0]

  def config(self, src: LlamaConfig) -> LlamaConfig:
    """The candidate's config; with mixed layer kinds (`layer_types`) those of the first
    layers stand in until layer importance picks the kept ones."""
    return src.replace(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                       num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads
                       ).keep_layers(range(self.num_layers))

  def targets(self) -> slicing.Targets:
    return slicing.Targets(hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size,
                           num_attention_heads=self.num_heads,
                           num_key_value_heads=self.num_kv_heads,
                           num_hidden_layers=self.num_layers)

  def label(self) -> str:
    return (f"d{self.hidden_size}-f{self.intermediate_size}-n{self.num_heads}"
            f"k{self.num_kv_heads}-l{self.num_layers}")

  def to_json(self) -> dict[str, int]:
    return {"hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "num_hidden_layers": self.num_layers}


# ------------------------------------------------------------------------------ accounting


def param_count(src: LlamaConfig, c: Candidate) -> int:
  """Parameters of `src` pruned to `c`, summed layer by layer (a tied embedding counted once).

  Per layer: q and o (D x N x H each), k and v (D x K x H each), gate, up and down (D x F_l
  each), two RMSNorm weights (D); q/k/v biases ((N + 2K) x H), q/k norms (2 H) and the
  sandwich norms (2 D) where the family has them. Outside the layers: the embedding (V x D,
  twice when untied) and the final norm (D).
  """
  d, h = c.hidden_size, src.head_dim
  attn = d * h * (2 * c.num_heads + 2 * c.num_kv_heads) + 2 * d
  attn += ((c.num_heads + 2 * c.num_kv_heads) * h * src.attention_bias + 2 * h * src.qk_norm
           + 2 * d * src.sandwich_norms)
  layers = sum(attn + 3 * d * f for f in c.mlp_widths)
  return layers + src.vocab_size * d * (1 if src.tie_word_embeddings else 2) + d


def kv_cache_bytes(src: LlamaConfig, c: Candidate, kv_tokens: int, dtype: str) -> int:
  """Keys and values of `kv_tokens` positions in every layer: 2 x L x K x H x tokens."""
  return 2 * c.num_layers * c.num_kv_heads * src.head_dim * kv_tokens * DTYPE_BYTES[dtype]


def memory_bytes(src: LlamaConfig, c: Candidate, kv_tokens: int = 0,
                 dtype: str = "bfloat16") -> int:
  """Weights at `dtype` plus the KV cache (also at `dtype`) for `kv_tokens` tokens.

  Activations, the runtime's workspace and quantization scales are not counted.
  """
  return param_count(src, c) * DTYPE_BYTES[dtype] + kv_cache_bytes(src, c, kv_tokens, dtype)


# ------------------------------------------------------------------------------ enumeration


@dataclasses.dataclass(frozen=True)
class Budget:
  """What the candidates must meet. At least one of `target_params`, `target_memory_gb`."""

  target_params: float | None = None
  target_memory_gb: float | None = None
  kv_tokens: int = 0
  dtype: str = "bfloat16"
  slack: float = 0.05
  max_width_cut: float = 0.5
  max_depth_cut: float = 0.5
  multiple: int = 0  # width step; 0 = `granule()` of each teacher dimension

  def validate(self) -> None:
    """Raises SettingError (one line, naming the field) for a setting wrong on its own."""
    if self.target_params is None and self.target_memory_gb is None:
      raise SettingError("budget.target_params", "give {name} or target_memory_gb")
    if self.dtype not in DTYPE_BYTES:
      raise SettingError("budget.dtype",
                         f"{{name}}={self.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    for name in ("max_width_cut", "max_depth_cut"):
      v = getattr(self, name)
      if not 0 <= v < 1:
        raise SettingError(f"budget.{name}", f"{{name}}={v} must be in [0, 1)")
    if not 0 < self.slack <= 1:
      raise SettingError("budget.slack", f"{{name}}={self.slack} must be in (0, 1]")
    if self.multiple < 0:
      raise SettingError("budget.multiple",
                         f"{{name}}={self.multiple} must be >= 0 (0 = automatic)")
    if self.kv_tokens < 0:
      raise SettingError("budget.kv_tokens", f"{{name}}={self.kv_tokens} must be >= 0")

  def check(self, src: LlamaConfig) -> None:
    """Raises SettingError (one line, naming the field) for a budget no candidate can meet."""
    self.validate()
    full = Candidate(src.hidden_size, (src.intermediate_size,) * src.num_hidden_layers,
                     src.num_groups, src.num_key_value_heads)
    g = _grid(src, self)
    small = int(np.argmin(g["params"]))
    floor = (f"the smallest shape the search space allows (hidden {g['d'][small]}, MLP "
             f"{g['f'][small]}, {g['n'][small]} heads, {g['layers'][small]} layers; see "
             "max_width_cut, max_depth_cut)")
    if self.target_params is not None:
      t = self.target_params
      if not t > 0:
        raise SettingError("budget.target_params", f"{{name}}={t:g} must be positive")
      if t >= param_count(src, full):
        raise SettingError("budget.target_params", f"{{name}}={t:g} is not below the teacher's "
                           f"{param_count(src, full):,} parameters: nothing to prune")
      if t < g["params"][small]:
        raise SettingError("budget.target_params",
                           f"{{name}}={t:g} is smaller than {g['params'][small]:,} "
                           f"parameters, {floor}")
    if self.target_memory_gb is not None:
      gb = self.target_memory_gb
      if not gb > 0:
        raise SettingError("budget.target_memory_gb", f"{{name}}={gb:g} must be positive")
      least = int(g["memory"].min())
      if gb * 1e9 < least:
        raise SettingError("budget.target_memory_gb",
                           f"{{name}}={gb:g} is impossible: {floor} needs {least / 1e9:.3g} GB "
                           f"at {self.dtype} with kv_tokens={self.kv_tokens}")


def granule(size: int) -> int:
  """The step of hardware-friendly widths for a teacher dimension of `size`."""
  if size >= 2048 and size % 128 == 0:
    return 128
  for g in (64, 32, 16, 8):
    if size % g == 0:
      return g
  return 1


def width_options(size: int, max_cut: float, multiple: int = 0) -> list[int]:
  """Multiples of `multiple` (0: `granule(size)`) from `(1 - max_cut) * size` up to `size`
  (always included)."""
  g = multiple or granule(size)
  lo = math.ceil((1 - max_cut) * size - 1e-9)
  return sorted({size, *(w for w in range(g, size + 1, g) if w >= lo)})


def _grid(src: LlamaConfig, budget: Budget) -> dict[str, np.ndarray]:
  """Every shape of the search space (flat int64 arrays d, f, n, k, layers) with its params
  and memory; hidden sizes that are not a multiple of the head count are left out."""
  hidden = np.array(width_options(src.hidden_size, budget.max_width_cut, budget.multiple),
                    np.int64)
  mlp = np.array(width_options(src.intermediate_size, budget.max_width_cut, budget.multiple),
                 np.int64)
  min_heads = math.ceil((1 - budget.max_width_cut) * src.num_attention_heads - 1e-9)
  heads = np.array([(g, k) for k in range(1, src.num_key_value_heads + 1)
                    for g in range(1, src.num_groups + 1) if g * k >= min_heads], np.int64)
  min_layers = max(1, math.ceil((1 - budget.max_depth_cut) * src.num_hidden_layers - 1e-9))
  layers = np.arange(min_layers, src.num_hidden_layers + 1, dtype=np.int64)
  d, f, hk, n_l = (a.ravel() for a in np.meshgrid(hidden, mlp, np.arange(len(heads)), layers,
                                                  indexing="ij"))
  k = heads[hk, 1]
  n = heads[hk, 0] * k
  h = src.head_dim
  keep = d % n == 0
  d, f, n, k, n_l = d[keep], f[keep], n[keep], k[keep], n_l[keep]
  params = (n_l * (d * h * (2 * n + 2 * k) + 2 * d + 3 * d * f)
            + src.vocab_size * d * (1 if src.tie_word_embeddings else 2) + d)
  b = DTYPE_BYTES[budget.dtype]
  memory = params * b + 2 * n_l * k * h * budget.kv_tokens * b
  return {"d": d, "f": f, "n": n, "k": k, "layers": n_l, "params": params, "memory": memory}


def enumerate_candidates(src: LlamaConfig, budget: Budget) -> list[Candidate]:
  """Every uniform shape in the search space that meets `budget`, largest first.

  The accounting is closed-form integer arithmetic over the grid (numpy), so the full
  Llama-3.1-8B space costs milliseconds and no model memory.
  """
  budget.check(src)
  g = _grid(src, budget)
  d, f, n, k, n_l, params = (g[x] for x in ("d", "f", "n", "k", "layers", "params"))
  ok = np.ones(len(d), bool)
  if budget.target_params is not None:
    ok &= (params <= budget.target_params) & (params >= (1 - budget.slack) * budget.target_params)
  if budget.target_memory_gb is not None:
    ok &= g["memory"] <= budget.target_memory_gb * 1e9
    if budget.target_params is None:  # the largest shapes that fit: within `slack` of the best
      ok &= params >= (1 - budget.slack) * (params[ok].max() if ok.any() else 0)
  idx = np.flatnonzero(ok)
  # Largest first; ties by the shape itself, so the order never depends on the grid's.
  order = sorted(idx, key=lambda i: (-int(params[i]), -int(n_l[i]), -int(d[i]), -int(n[i]),
                                     -int(k[i]), -int(f[i])))
  out = [Candidate(int(d[i]), (int(f[i]),) * int(n_l[i]), int(n[i] // k[i]), int(k[i]))
         for i in order]
  if not out:
    raise ValueError("no candidate meets the budget in this search space: raise the target, "
                     "budget_slack, max_width_cut or max_depth_cut")
  return out


def shortlist(candidates: Sequence[Candidate], src: LlamaConfig, n: int) -> list[Candidate]:
  """The `n` candidates to score: for each (hidden, heads, KV groups, depth) only the widest MLP
  that fits (MLP width fills the budget last), then the largest first."""
  best: dict[tuple, Candidate] = {}
  for c in candidates:  # already largest first, so the first seen per key is the widest
    best.setdefault((c.hidden_size, c.num_heads, c.num_kv_heads, c.num_layers), c)
  return list(best.values())[:n]


def table(src: LlamaConfig, candidates: Sequence[Candidate], budget: Budget,
          extra: dict[Candidate, dict[str, Any]] | None = None) -> str:
  """A fixed-width table of candidates (one line each) with their accounting."""
  cols = ["hidden", "mlp", "heads", "kv", "layers", "params", "memory_GB"]
  keys = sorted({k for v in (extra or {}).values() for k in v})
  lines = ["  ".join(f"{c:>10}" for c in cols + keys)]
  for c in candidates:
    row = [c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.num_layers,
           f"{param_count(src, c) / 1e6:.1f}M",
           f"{memory_bytes(src, c, budget.kv_tokens, budget.dtype) / 1e9:.3f}"]
    row += [_fmt((extra or {}).get(c, {}).get(k)) for k in keys]
    lines.append("  ".join(f"{v:>10}" for v in row))
  return "\n".join(lines)


def _fmt(v) -> str:
  if v is None:
    return "-"
  return f"{v:.4f}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------ scoring


def plan_for(src: LlamaConfig, c: Candidate, scores: I.Scores, layer_scores: np.ndarray
             ) -> slicing.PrunePlan:
  """The pruning plan of `c` from importance computed once on the teacher: the most important
  units of every width axis, and the `c.num_layers` most important layers (`layer_scores`:
  (L,), higher = keep)."""
  return slicing.make_plan(src, c.targets(), scores, np.asarray(layer_scores), drop_block=False)


def oneshot_loss(params, src: LlamaConfig, c: Candidate, scores: I.Scores,
                 layer_scores: np.ndarray, windows: np.ndarray, batch_size: int) -> float:
  """Mean next-token loss of the one-shot pruned candidate on held-out windows (B, T)."""
  pruned, cfg = slicing.prune(params, src, plan_for(src, c, scores, layer_scores))
  return mean_loss(pruned, cfg, windows, batch_size)


def mean_loss(params, cfg: LlamaConfig, windows: np.ndarray, batch_size: int) -> float:
  """Token-weighted mean of `importance.lm_loss` over windows of equal length."""
  loss = I.jitted_lm_loss(cfg)
  total, n = 0.0, 0
  for i in range(0, len(windows), batch_size):
    chunk = np.asarray(windows[i:i + batch_size], np.int32)
    total += float(loss(params, chunk)) * len(chunk)
    n += len(chunk)
  if not n:
    raise ValueError("no held-out windows to score candidates on (--eval_samples)")
  return total / n


def rank_changes(before: Sequence[float], after: Sequence[float]) -> list[int]:
  """Per candidate (same order), one-shot rank minus post-distillation rank (1 = best;
  positive = moved up)."""
  def ranks(v):
    order = np.argsort(np.asarray(v, np.float64), kind="stable")
    r = np.empty(len(v), np.int64)
    r[order] = np.arange(1, len(v) + 1)
    return r
  return (ranks(before) - ranks(after)).tolist()
