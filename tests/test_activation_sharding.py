"""Activation constraints: the model pins batch / heads / mlp / vocab axes of its activations by
the parameters' rules when a mesh is set, changes nothing without one, and on 8 (forced) CPU
devices gives the single-device result.

The 8-device half runs this file as a script in a subprocess, since the device count is fixed
when JAX starts."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T = 8, 16


def _problem():
  from minitron_jax import config, model as M

  cfg = config.preset("tiny")
  params = M.init_params(cfg, jax.random.key(0), std=0.1)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
  segs = np.ones((B, T), np.int32)
  segs[:, 9:] = 2
  segs[::3, -2:] = 0
  pos = np.where(segs == 2, np.arange(T) - 9, np.arange(T)).astype(np.int32)
  return cfg, params, tokens, segs, pos


def _forward(cfg):
  from minitron_jax import model as M

  def f(p, tokens, segs, pos):
    out = M.forward(p, cfg, tokens, positions_bt=pos, segment_ids_bt=segs, return_hidden=True)
    return out["logits"], out["hidden"]
  return f


def worker(mesh_spec: str) -> dict:
  """On 8 devices: the forward over `mesh_spec`, its constraints, shardings and values."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from minitron_jax import sharding

  cfg, params, tokens, segs, pos = _problem()
  single = jax.jit(_forward(cfg))(params, tokens, segs, pos)  # no mesh: one device
  mesh = sharding.make_mesh(mesh_spec)
  p_sh = sharding.param_shardings(cfg, mesh)
  b_sh = sharding.batch_sharding(mesh)
  jitted = jax.jit(_forward(cfg), in_shardings=(p_sh, b_sh, b_sh, b_sh))
  args = (jax.device_put(params, p_sh),) + tuple(jax.device_put(x, b_sh)
                                                 for x in (tokens, segs, pos))
  unconstrained = jitted.lower(*args).as_text()
  with sharding.use_mesh(mesh):
    lowered = jitted.lower(*args)
  compiled = lowered.compile()
  logits, hidden = compiled(*args)
  batch = sharding.logical_to_spec(("batch",), mesh=mesh)[0]
  # The Pallas splash kernel (interpreted on CPU) under shard_map over the same mesh.
  splash = jax.jit(_forward(cfg.replace(attention_impl="splash")),
                   in_shardings=(p_sh, b_sh, b_sh, b_sh))
  with sharding.use_mesh(mesh):
    splash_logits, _ = splash(*args)
  real = segs != 0

  def constraints(text):  # Shardy's op, or GSPMD's custom call
    return text.count("sdy.sharding_constraint") + text.count("@Sharding")
  return {
      "constraints": constraints(lowered.as_text()),
      "constraints_without_mesh": constraints(unconstrained),
      "logits_spec_ok": logits.sharding.is_equivalent_to(
          NamedSharding(mesh, P(batch, None, sharding.logical_to_spec(
              ("vocab",), mesh=mesh)[0])), 3),
      "hidden_spec_ok": hidden.sharding.is_equivalent_to(
          NamedSharding(mesh, P(None, batch, None, None)), 4),
      "hlo": compiled.as_text(),
      "max_diff": max(float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))
                      for a, b in zip((logits, hidden), single)),
      "splash_max_diff": float(np.max(np.abs(np.asarray(splash_logits)[real]
                                             - np.asarray(single[0])[real]))),
  }


def _run_on_8_devices(mesh_spec: str, tmp_path) -> dict:
  out = tmp_path / "result.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), mesh_spec, str(out)],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text())


def test_activations_are_constrained_by_the_rules_on_8_devices(tmp_path):
  res = _run_on_8_devices("data:2,fsdp:2,tensor:2", tmp_path)
  # The embedding; in the scanned layer body (once): q, k, v, attention out, mlp act and both
  # residual adds; the logits.
  assert res["constraints"] == 1 + 7 + 1 and res["constraints_without_mesh"] == 0
  assert res["logits_spec_ok"] and res["hidden_spec_ok"]
  # Per device: rows over data x fsdp (8 / 4), the 128-wide MLP over tensor (64).
  assert "f32[2,16,64]" in res["hlo"]
  assert res["max_diff"] <= 1e-5
  assert res["splash_max_diff"] <= 1e-5  # real tokens; padding outputs are unspecified


def test_fsdp_only_mesh_equals_one_device(tmp_path):
  res = _run_on_8_devices("fsdp:8", tmp_path)
  assert res["constraints"] > 0 and res["logits_spec_ok"] and res["hidden_spec_ok"]
  assert res["max_diff"] <= 1e-5


def test_constrain_is_a_no_op_without_a_mesh():
  from minitron_jax import model as M, sharding

  cfg, params, tokens, segs, pos = _problem()
  jaxpr = str(jax.make_jaxpr(_forward(cfg))(params, tokens, segs, pos))
  assert "sharding_constraint" not in jaxpr
  assert sharding.active_mesh() is None
  x = jnp.ones((2, 3))
  assert sharding.constrain(x, ("batch", "seq")) is x
  mesh = sharding.make_mesh("data:1")
  with sharding.use_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(lambda t: M.embed(params, cfg, t))(tokens))
  assert "sharding_constraint" in jaxpr


if __name__ == "__main__":
  result = worker(sys.argv[1])
  with open(sys.argv[2], "w") as f:
    json.dump(result, f)
