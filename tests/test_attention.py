"""Attention kernels that take segment ids equal the masked XLA reference (Pallas kernels run in
the interpreter on CPU): packed rows, padding, GQA, odd lengths; values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax import attention as A, config, model as M


def _qkv(seed, b=2, t=37, n=4, k=2, h=16):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  kk = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32)
  seg = np.ones((b, t), np.int32)
  seg[:, 20:] = 2       # two documents per row
  seg[0, 29:] = 3       # three in the first
  seg[1, -5:] = 0       # padding at the end of the second
  return q, kk, v, jnp.asarray(seg)


def _numpy_reference(q, k, v, seg, scale):
  """Loops over queries: each attends to earlier keys of its own document."""
  q, k, v, seg = map(np.asarray, (q, k, v, seg))
  b, t, n, h = q.shape
  g = n // k.shape[2]
  out = np.zeros_like(q)
  for i in range(b):
    for j in range(t):
      if seg[i, j] == 0:
        continue
      keys = [s for s in range(j + 1) if seg[i, s] == seg[i, j]]
      for head in range(n):
        logits = k[i, keys, head // g] @ q[i, j, head] * scale
        p = np.exp(logits - logits.max())
        out[i, j, head] = (p / p.sum()) @ v[i, keys, head // g]
  return out


@pytest.mark.parametrize("impl,kv_heads", [("xla", 2), ("splash", 2), ("splash", 4),
                                            ("pallas_gpu", 2)])  # 2: GQA, 4: MHA
def test_packed_attention_matches_the_reference_with_gradients(impl, kv_heads):
  q, k, v, seg = _qkv(0, k=kv_heads)
  real = np.asarray(seg != 0)
  ref = _numpy_reference(q, k, v, seg, 0.25)
  out = jax.jit(lambda *a: A.attend(*a, seg, scale=0.25, impl=impl))(q, k, v)
  np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=2e-6)
  # Gradients through the real positions only (padding outputs are unspecified).
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * real[..., None,
                                                                                    None]

  def loss(impl, q, k, v):
    return jnp.sum(A.attend(q, k, v, seg, scale=0.25, impl=impl) * w)
  grads = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)
  for g, r in zip(grads(impl, q, k, v), grads("xla", q, k, v)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5)


@pytest.mark.parametrize("impl", ["splash", "pallas_gpu"])
def test_unpacked_rows_are_plain_causal_attention(impl):
  q, k, v, _ = _qkv(2, t=130)  # more than one 128-token block, padded to two
  ref = A.attend(q, k, v, None, scale=0.25, impl="xla")
  out = A.attend(q, k, v, None, scale=0.25, impl=impl)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)


def test_model_forward_with_splash_equals_xla_on_packed_rows():
  cfg = config.preset("tiny", vocab_size=97)
  params = M.init_params(cfg, jax.random.key(0), std=0.1)
  _, _, _, seg = _qkv(3)
  tokens = np.random.default_rng(4).integers(0, 97, seg.shape).astype(np.int32)
  seg_np = np.asarray(seg)
  pos = np.array([[j - list(row).index(row[j]) for j in range(len(row))] for row in seg_np],
                 np.int32)
  logits = {impl: np.asarray(jax.jit(lambda p: M.forward(
      p, cfg.replace(attention_impl=impl), tokens, positions_bt=pos,
      segment_ids_bt=seg)["logits"])(params)) for impl in ("xla", "splash")}
  real = np.asarray(seg != 0)
  np.testing.assert_allclose(logits["splash"][real], logits["xla"][real], atol=1e-5)


def test_auto_picks_by_backend_and_bad_choices_are_refused():
  assert A.resolve_impl("auto", True, "tpu") == "splash"
  assert A.resolve_impl("auto", True, "gpu") == "pallas_gpu"
  assert A.resolve_impl("auto", False, "gpu") == "cudnn"
  assert A.resolve_impl("auto", True, "cpu") == "xla"
  assert A.resolve_impl("splash", True, "cpu") == "splash"
  with pytest.raises(ValueError, match="attention_impl"):
    A.resolve_impl("flash", True)
  with pytest.raises(config.ConfigError, match="attention_impl"):
    config.preset("tiny", attention_impl="flash")
  q, k, v, seg = _qkv(0)
  with pytest.raises(ValueError, match="no segment ids"):
    A.attend(q, k, v, seg, scale=0.25, impl="cudnn")
