"""Analytic FLOP counts of the recipe's compiled steps, for comparison with XLA's cost analysis.

Only matrix multiplications are counted (2 FLOPs per multiply-add); norms, RoPE, softmax and
the optimizer are a few FLOPs per element and ignored, as in MaxText's and PaLM's MFU. The
attention core is counted in full (T x T scores per head), as a dense implementation computes
it, masks and all; `causal=True` counts only the (query, key) pairs the mask keeps, what a
kernel that skips masked keys needs: query i sees its i + 1 keys on a global layer and
min(i + 1, sliding_window) on a sliding-window layer (Mistral's, Gemma 3's local layers;
`LlamaConfig.sliding_layers` says which).

XLA's cost analysis does not see inside a Pallas (Mosaic) kernel: a splash attention call
counts as no FLOPs. `splash_flops` is what those kernels execute, block by block, and is added
to XLA's count of the rest of a compiled step.
"""

from __future__ import annotations

import dataclasses

from minitron_jax.config import LlamaConfig


def matmul_params(cfg: LlamaConfig) -> int:
  """Weights that take part in a matmul per token: every projection and the LM head (the
  embedding lookup is a gather, no FLOPs)."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  n, k = cfg.num_attention_heads, cfg.num_key_value_heads
  per_layer = d * h * (2 * n + 2 * k) + 3 * d * f
  return cfg.num_hidden_layers * per_layer + cfg.vocab_size * cfg.hidden_size


def _sum_min(lo: int, hi: int, cap: int | None) -> int:
  """sum of min(m, cap) for m in [lo, hi] (cap None: no cap)."""
  if hi < lo:
    return 0
  top = hi if cap is None else min(hi, cap)
  below = (lo + top) * (top - lo + 1) // 2 if top >= lo else 0
  return below + (0 if cap is None else cap * max(0, hi - max(lo, cap + 1) + 1))


def attended_pairs(q_len: int, kv_len: int, window: int | None = None) -> int:
  """(query, key) pairs a causal mask keeps when the `q_len` queries are the last of
  `kv_len` positions: the query at position p sees min(p + 1, `window`) keys (all p + 1
  without a window)."""
  if not 0 < q_len <= kv_len:
    raise ValueError(f"need 0 < q_len <= kv_len, got q_len={q_len}, kv_len={kv_len}")
  return _sum_min(kv_len - q_len + 1, kv_len, window)


def layer_windows(cfg: LlamaConfig) -> tuple[int | None, ...]:
  """Per layer, the keys a query may see: `sliding_window` on a sliding layer, else None."""
  return tuple(cfg.sliding_window if s else None for s in cfg.sliding_layers)


def attention_flops(cfg: LlamaConfig, batch: int, q_len: int, kv_len: int,
                    causal: bool = False) -> int:
  """Forward FLOPs of q.k^T and p.v over all layers: 2 matmuls of 2*H FLOPs per (query, key)
  pair and head; every T*S pair, or with `causal` those each layer's mask keeps."""
  per_pair = 4 * batch * cfg.num_attention_heads * cfg.head_dim
  if not causal:
    return cfg.num_hidden_layers * per_pair * q_len * kv_len
  return per_pair * sum(attended_pairs(q_len, kv_len, w) for w in layer_windows(cfg))


def head_flops(cfg: LlamaConfig, batch: int, seq: int) -> int:
  """The LM head: logits for every token."""
  return 2 * batch * seq * cfg.vocab_size * cfg.hidden_size


def forward_flops(cfg: LlamaConfig, batch: int, seq: int, causal: bool = False) -> int:
  """One forward pass over `batch` rows of `seq` tokens."""
  return 2 * batch * seq * matmul_params(cfg) + attention_flops(cfg, batch, seq, seq, causal)


def decode_flops(cfg: LlamaConfig, batch: int, kv_len: int) -> int:
  """One decode step: one new token per row attending to `kv_len` cache slots."""
  return 2 * batch * matmul_params(cfg) + attention_flops(cfg, batch, 1, kv_len)


# Matmuls per (query block, key block) pair of the splash kernels: the forward kernel computes
# q.k^T and p.v; the backward runs a dq kernel (q.k^T again, dO.v^T, dS.k) and a dk/dv kernel
# (q.k^T again, p^T.dO, dO.v^T, dS^T.q).
SPLASH_MATMULS = {"forward": 2, "backward": 7}


def splash_blocks(seq: int, block: int, window: int | None = None) -> int:
  """(query block, key block) pairs a causal splash kernel computes: those on or below the
  diagonal that hold a key the mask keeps, in full although partly masked. With a `window`
  (a `LocalMask`), key block i - d of query block i holds one when (d - 1) * block + 1 <
  window: the nearest pair is that far apart."""
  n = -(-seq // block)
  if window is None:
    return n * (n + 1) // 2
  reach = -(-(window - 1) // block)  # the farthest block distance d that holds a kept key
  return sum(1 + min(i, reach) for i in range(n))


def splash_flops(cfg: LlamaConfig, batch: int, seq: int, block: int, kernel: str = "forward"
                 ) -> int:
  """FLOPs of the causal splash attention kernels (`kernel`: "forward" or "backward") over
  all layers (a sliding layer's within its window), every query head, `block` x `block`
  tiles of `head_dim`-wide matmuls."""
  per_block = SPLASH_MATMULS[kernel] * 2 * block * block * cfg.head_dim
  blocks = sum(splash_blocks(seq, block, w) for w in layer_windows(cfg))
  return batch * cfg.num_attention_heads * blocks * per_block


@dataclasses.dataclass(frozen=True)
class DistillFlops:
  """FLOPs of one distillation micro-batch, by part."""

  student_fwd: int
  student_bwd: int
  teacher_fwd: int
  remat: int  # the student's layers forward again, in the backward pass, when rematerialising

  @property
  def model(self) -> int:
    """The useful work: student forward and backward, teacher forward."""
    return self.student_fwd + self.student_bwd + self.teacher_fwd

  @property
  def total(self) -> int:
    """What the step executes, recomputation included."""
    return self.model + self.remat


def distill_flops(student: LlamaConfig, teacher: LlamaConfig, batch: int, seq: int,
                  remat: bool = False, causal: bool = False) -> DistillFlops:
  """Student forward + backward (twice the forward: gradients of activations and of
  weights), teacher forward, and with `remat` one more forward of the student's layers (the
  rematerialised scan body; the LM head after it is not recomputed)."""
  s = forward_flops(student, batch, seq, causal)
  return DistillFlops(student_fwd=s, student_bwd=2 * s,
                      teacher_fwd=forward_flops(teacher, batch, seq, causal),
                      remat=s - head_flops(student, batch, seq) if remat else 0)
