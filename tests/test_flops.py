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
  # Causal: query i sees i + 1 keys, 36 of the 64 pairs.
  assert F.attention_flops(CFG, 2, 8, 8, causal=True) == 2 * 4 * 2 * 36 * 4 * 16 == 36864
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


def _mask_pairs(q_len, kv_len, window):
  """Brute force: the ones of the causal (windowed) mask of the last q_len of kv_len positions."""
  q = np.arange(kv_len - q_len, kv_len)[:, None]
  k = np.arange(kv_len)[None, :]
  mask = k <= q
  if window is not None:
    mask &= k > q - window
  return int(mask.sum())


@pytest.mark.parametrize("family", ["gemma3_text", "mistral", "llama"])
def test_causal_attention_flops_count_the_masks_ones(family):
  """Each layer's causal count is its mask's ones (numpy), a sliding layer's within its
  window; the dense count is every pair on every layer, whatever the windows."""
  from helpers import family_config

  cfg = (CFG.replace(num_hidden_layers=3) if family == "llama"
         else family_config(family, num_hidden_layers=3))
  windows = {"llama": (None,) * 3, "mistral": (6,) * 3, "gemma3_text": (5, None, 5)}[family]
  assert F.layer_windows(cfg) == windows
  per_pair = 4 * 2 * cfg.num_attention_heads * cfg.head_dim
  for q_len, kv_len in [(12, 12), (1, 12), (4, 12), (3, 3), (64, 64), (1, 1)]:
    want = per_pair * sum(_mask_pairs(q_len, kv_len, w) for w in windows)
    assert F.attention_flops(cfg, 2, q_len, kv_len, causal=True) == want, (q_len, kv_len)
    assert F.attention_flops(cfg, 2, q_len, kv_len) == 3 * per_pair * q_len * kv_len
  for w in (1, 2, 5, 11, 12, 13, 100):
    assert F.attended_pairs(12, 12, w) == _mask_pairs(12, 12, w), w
    assert F.attended_pairs(5, 12, w) == _mask_pairs(5, 12, w), w
  with pytest.raises(ValueError, match="q_len"):
    F.attended_pairs(13, 12)


def test_llama_counts_are_those_of_a_window_the_length_of_the_sequence():
  """A window as long as the sequence is no window: Mistral's counts equal Llama's."""
  from helpers import family_config

  mistral = family_config("mistral", num_hidden_layers=2, sliding_window=64)
  llama = mistral.replace(model_type="llama", sliding_window=None)
  for causal in (False, True):
    assert F.forward_flops(mistral, 2, 64, causal) == F.forward_flops(llama, 2, 64, causal)
  # One token more and the window cuts: the dense count stays, the causal one drops.
  assert F.forward_flops(mistral, 2, 65) == F.forward_flops(llama, 2, 65)
  assert F.forward_flops(mistral, 2, 65, True) < F.forward_flops(llama, 2, 65, True)
  assert F.splash_flops(mistral, 2, 64, 16) == F.splash_flops(llama, 2, 64, 16)


def test_windowed_splash_blocks_match_a_brute_force_count():
  """Blocks of the padded block grid that hold a kept (query, key) pair."""
  for seq, block in [(64, 16), (60, 16), (7, 8), (100, 32)]:
    n = -(-seq // block)
    for window in (None, 1, 2, 16, 17, 18, 33, 40, 200):
      q = np.arange(n * block)[:, None]
      k = np.arange(n * block)[None, :]
      mask = (k <= q) & ((k > q - window) if window else True)
      blocks = mask.reshape(n, block, n, block).any(axis=(1, 3)).sum()
      assert F.splash_blocks(seq, block, window) == blocks, (seq, block, window)


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
  # A sliding layer's LocalMask of 300 keys: the diagonal and two blocks back, 1 + 2 + 3 + 3.
  local = attention._splash_kernel(t, groups, block, True, window=300)
  assert F.splash_blocks(t, block, 300) == 9
  for info in (local.fwd_mask_info, local.dq_mask_info, local.dkv_mask_info):
    assert np.count_nonzero(info.block_mask) == 9
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
