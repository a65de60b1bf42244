"""Attention kernels that take segment ids equal the masked XLA reference (Pallas kernels run in
the interpreter on CPU): packed rows, padding, GQA, odd lengths; values and gradients."""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax import attention as A, config, model as M
from minitron_jax.distill import step as train


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


def _numpy_reference(q, k, v, seg, scale, window=None):
  """Loops over queries: each attends to earlier keys of its own document (the last `window`
  positions only, its own included, when a window is given)."""
  q, k, v, seg = map(np.asarray, (q, k, v, seg))
  b, t, n, h = q.shape
  g = n // k.shape[2]
  out = np.zeros_like(q)
  for i in range(b):
    for j in range(t):
      if seg[i, j] == 0:
        continue
      first = 0 if window is None else max(0, j - window + 1)
      keys = [s for s in range(first, j + 1) if seg[i, s] == seg[i, j]]
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


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_sliding_window_matches_the_reference(impl):
  """Mistral's and Gemma 3's local layers: keys less than `window` positions back."""
  q, k, v, seg = _qkv(3)
  real = np.asarray(seg != 0)
  ref = _numpy_reference(q, k, v, seg, 0.25, window=6)
  out = A.attend(q, k, v, seg, scale=0.25, impl=impl, window=6)
  np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=2e-6)
  unpacked = A.attend(q, k, v, None, scale=0.25, impl=impl, window=6)
  ref = _numpy_reference(q, k, v, jnp.ones_like(seg), 0.25, window=6)
  np.testing.assert_allclose(np.asarray(unpacked), ref, atol=2e-6)
  with pytest.raises(ValueError, match="no sliding window"):
    A.attend(q, k, v, seg, scale=0.25, impl="pallas_gpu", window=6)
  np.testing.assert_array_equal(  # a window as long as the rows changes nothing
      A.attend(q, k, v, seg, scale=0.25, impl="xla", window=37),
      A.attend(q, k, v, seg, scale=0.25, impl="xla"))


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
  with pytest.raises(ValueError, match="attention_impl"):
    train.TrainConfig(attention_impl="flash")
  q, k, v, seg = _qkv(0)
  with pytest.raises(ValueError, match="no segment ids"):
    A.attend(q, k, v, seg, scale=0.25, impl="cudnn")


_TPU_COMPILE = """
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from minitron_jax import attention as A, sharding
devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
mesh = Mesh(np.array(devices).reshape(2, 1, 2), sharding.MESH_AXES)
q = jax.ShapeDtypeStruct((4, 1000, 8, 128), jnp.bfloat16, sharding=NamedSharding(
    mesh, P("data", None, "tensor", None)))
kv = jax.ShapeDtypeStruct((4, 1000, 2, 128), jnp.bfloat16, sharding=NamedSharding(
    mesh, P("data", None, "tensor", None)))
seg = jax.ShapeDtypeStruct((4, 1000), jnp.int32, sharding=NamedSharding(mesh, P("data", None)))
f = jax.jit(jax.value_and_grad(lambda q, k, v, s: jnp.sum(
    A.attend(q, k, v, s, scale=128 ** -0.5).astype(jnp.float32)), argnums=(0, 1, 2)))
with sharding.use_mesh(mesh):
  lowered = f.lower(q, kv, kv, seg)
assert "tpu_custom_call" in lowered.as_text()  # the splash kernel, not the XLA fallback
lowered.compile()
print("COMPILED")
"""


def test_splash_compiles_for_a_tpu_topology_under_a_mesh():
  """Ahead-of-time, from this host: "auto" picks splash for TPU devices and the kernel lowers
  and compiles inside shard_map (needs libtpu, e.g. `pip install "jax[tpu]"`)."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
  env.pop("JAX_PLATFORMS", None)
  proc = subprocess.run([sys.executable, "-c", _TPU_COMPILE], env=env, cwd=root,
                        capture_output=True, text=True, timeout=600)
  assert "COMPILED" in proc.stdout, proc.stderr[-3000:]
