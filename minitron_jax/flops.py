"""Analytic FLOP counts of the recipe's compiled steps, for comparison with XLA's cost analysis.

Only matrix multiplications are counted (2 FLOPs per multiply-add); norms, RoPE, softmax and
the optimizer are a few FLOPs per element and ignored, as in MaxText's and PaLM's MFU. The
attention core is counted in full (T x T scores per head), as a dense implementation computes
it; a causal kernel that skips the masked half does half of that (`causal=True`).

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


def attention_flops(cfg: LlamaConfig, batch: int, q_len: int, kv_len: int,
                    causal: bool = False) -> int:
  """Forward FLOPs of q.k^T and p.v over all layers: 2 matmuls of 2*T*S*H per head."""
  full = 4 * batch * q_len * kv_len * cfg.num_attention_heads * cfg.head_dim
  return cfg.num_hidden_layers * (full // 2 if causal else full)


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


def splash_blocks(seq: int, block: int) -> int:
  """(query block, key block) pairs a causal splash kernel computes: those on or below the
  diagonal, the diagonal ones in full although half masked."""
  n = -(-seq // block)
  return n * (n + 1) // 2


def splash_flops(cfg: LlamaConfig, batch: int, seq: int, block: int, kernel: str = "forward"
                 ) -> int:
  """FLOPs of the causal splash attention kernels (`kernel`: "forward" or "backward") over
  all layers, every query head, `block` x `block` tiles of `head_dim`-wide matmuls."""
  per_block = SPLASH_MATMULS[kernel] * 2 * block * block * cfg.head_dim
  return (cfg.num_hidden_layers * batch * cfg.num_attention_heads * splash_blocks(seq, block)
          * per_block)


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
