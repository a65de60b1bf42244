"""Analytic FLOP counts against a count by hand and against XLA's own count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax import config, flops as F, model as M

CFG = config.preset("tiny")  # V 256, D 64, F 128, L 2, N 4, K 2, H 16


def test_forward_and_distill_flops_match_a_hand_count():
  # Per layer: q 64*4*16 + k 64*2*16 + v 64*2*16 + o 4*16*64 = 12288; gate/up/down
  # 3*64*128 = 24576; two layers and the LM head 256*64: 2*36864 + 16384 = 90112 weights.
  assert F.matmul_params(CFG) == 90112
  # B=2, T=8: 2*16 tokens*90112 + attention 2 layers * 4*2*8*8*4 heads*16 = 65536.
  assert F.attention_flops(CFG, 2, 8, 8) == 65536
  assert F.attention_flops(CFG, 2, 8, 8, causal=True) == 32768
  assert F.forward_flops(CFG, 2, 8) == 2 * 16 * 90112 + 65536 == 2949120
  # One decode token per row over 32 cache slots: 2*2*90112 + 2 layers * 4*2*1*32*4*16.
  assert F.decode_flops(CFG, 2, 32) == 360448 + 32768
  student = CFG.replace(hidden_size=32, num_hidden_layers=1)
  # Student: 4*16*32*2 + 2*16*32*2 + 3*32*128 = 6144 + 12288 = 18432 per layer, head 8192.
  s_fwd = 2 * 16 * (18432 + 8192) + 4 * 2 * 8 * 8 * 4 * 16
  d = F.distill_flops(student, CFG, 2, 8, remat=True)
  assert (d.student_fwd, d.student_bwd, d.teacher_fwd) == (s_fwd, 2 * s_fwd, 2949120)
  assert d.remat == s_fwd - 2 * 16 * 8192  # the LM head is outside the rematerialised scan
  assert d.model == 3 * s_fwd + 2949120 and d.total == d.model + d.remat


def test_forward_flops_match_xla_on_an_unrolled_model():
  """XLA counts every op of a loop-free forward; matmuls dominate, so it lands just above."""
  from benchmarks.aot import cost, unrolled_scans

  cfg = CFG.replace(hidden_size=128, intermediate_size=512, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=1024)
  params = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)
  with unrolled_scans():
    compiled = jax.jit(lambda p, t: M.forward(p, cfg, t)["logits"]).lower(params,
                                                                          tokens).compile()
  xla, _ = cost(compiled)
  want = F.forward_flops(cfg, 2, 64)
  assert want <= xla <= 1.1 * want, (xla, want)
  # Without unrolling, XLA counts the layer scan's body once: what the unrolling is for.
  rolled = jax.jit(lambda p, t: M.forward(p, cfg, t)["logits"]).lower(params, tokens).compile()
  per_layer = (F.forward_flops(cfg, 2, 64) - F.head_flops(cfg, 2, 64)) / cfg.num_hidden_layers
  assert np.isclose(xla - cost(rolled)[0], per_layer * (cfg.num_hidden_layers - 1), rtol=0.1)


def _dot_flops(jaxpr) -> int:
  """2 x output elements x contracted size of every dot_general, in nested jaxprs too."""
  from jax.extend.core import jaxprs_in_params

  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i]
                                                                        for i in contract]))
    for sub in jaxprs_in_params(eqn.params):
      total += _dot_flops(sub)
  return total


def _kernel_bodies(fn, *args) -> list[int]:
  """Matmul FLOPs of one grid step of every Pallas kernel `fn` calls."""
  from jax.extend.core import jaxprs_in_params

  out = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        out.append(_dot_flops(eqn.params["jaxpr"]))
      else:
        for sub in jaxprs_in_params(eqn.params):
          walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return out


def test_splash_flops_match_the_kernels_block_grid_and_bodies():
  """The causal splash kernels' own block tables and kernel bodies, traced: 10 of 16 blocks
  of a 4 x 4 grid, 2 block matmuls per grid step forward and 3 + 4 backward."""
  from minitron_jax import attention

  t, block, groups, h = 1024, 256, 2, 32
  kernel = attention._splash_kernel(t, groups, block, True)
  assert F.splash_blocks(t, block) == 10 == F.splash_blocks(t - 100, block)
  for info in (kernel.fwd_mask_info, kernel.dq_mask_info, kernel.dkv_mask_info):
    assert np.count_nonzero(info.block_mask) == 10
  q = jnp.ones((groups, t, h), jnp.float32)
  kv = jnp.ones((t, h), jnp.float32)
  f = lambda q, k, v: kernel(q, k, v).sum()  # noqa: E731
  per_matmul = 2 * block * block * h
  assert _kernel_bodies(f, q, kv, kv) == [F.SPLASH_MATMULS["forward"] * per_matmul]
  fwd, *bwd = _kernel_bodies(jax.grad(f, argnums=(0, 1, 2)), q, kv, kv)
  assert fwd == F.SPLASH_MATMULS["forward"] * per_matmul
  assert sorted(bwd) == [3 * per_matmul, 4 * per_matmul]
  assert sum(bwd) == F.SPLASH_MATMULS["backward"] * per_matmul
  # One grid step per block pair and query head, every layer and row.
  cfg = CFG.replace(head_dim=h)
  assert F.splash_flops(cfg, 3, t, block, "backward") == (
      cfg.num_hidden_layers * 3 * cfg.num_attention_heads * 10 * sum(bwd))


def test_mfu_counts_causal_attention_once():
  """A causal forward at peak speed is 100 % MFU, not more, although the analytic column
  counts the whole T x T attention."""
  from benchmarks import aot

  cfg = config.preset("tiny")
  full, causal = F.forward_flops(cfg, 2, 512), F.forward_flops(cfg, 2, 512, causal=True)
  assert causal < full
  mem = aot.Memory(arguments=1, outputs=1, temporaries=1, aliased=0, code=0)
  rep = aot.StageReport("evaluate", "m", "fsdp:1", "2 x 512", mem, 2 ** 30, causal, 0.0, full,
                        1e12, 1e12, useful_flops=causal)
  assert rep.mfu == pytest.approx(1.0)
  old = aot.StageReport("evaluate", "m", "fsdp:1", "2 x 512", mem, 2 ** 30, causal, 0.0, full,
                        1e12, 1e12)
  assert old.mfu == pytest.approx(full / causal) and old.mfu > 1
