"""Two processes, one global mesh: a distillation step, perplexity and activation importance
on `data:2,fsdp:2,tensor:2` over 2 processes x 4 CPU devices give the numbers of one process
on one device.

Each process is started with `jax.distributed.initialize` on localhost and gloo CPU
collectives, passes the same host values (params, text, calibration batches) as every host
of a pod does, and feeds only the rows and shards its own devices hold. The workers are
subprocesses (this file doubles as their script) because the device count must be set before
jax is imported.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = "data:2,fsdp:2,tensor:2"
TOL = 1e-5
TIMEOUT_S = 240


# ---------------------------------------------------------------------------- worker side


def _init(cfg, seed):
  """Random params in numpy (no compiles), norms away from one so a misplaced one shows."""
  from minitron_jax import axes

  rng = np.random.default_rng(seed)
  return axes.tree_from_leaves(
      (s, (1.0 + 0.1 * rng.standard_normal(axes.shape(s, cfg))).astype(np.float32)
       if s.path[-1].endswith("norm") else
       (0.1 * rng.standard_normal(axes.shape(s, cfg))).astype(np.float32))
      for s in axes.param_specs(cfg))


def _flat(tree, prefix):
  import jax

  return {prefix + "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def distill_step(tp, tcfg, sp, scfg, mesh) -> dict[str, np.ndarray]:
  """One distillation update (2 micro-batches, remat, chunked logits, hidden-state loss) as
  the training run feeds it: each process passes its own contiguous block of the global
  batch's rows (`batch_rows`, `global_batch`).

  Adam's first update is lr * g / (|g| + eps) per element: with a tiny eps a gradient
  element at round-off level flips between -lr and +lr, so eps is large enough here for the
  update to be a smooth function of the gradient."""
  import jax
  from jax.experimental import multihost_utils

  from minitron_jax import sharding
  from minitron_jax.distill import losses as distill
  from minitron_jax.distill import step as train

  cfg = train.TrainConfig(global_batch_size=8, micro_batch_size=4, seq_len=16, lr=3e-3,
                          warmup_steps=0, eps=1e-3, dtype="float32", remat=True,
                          logits_chunk=8)
  dcfg = distill.DistillConfig(hidden_loss="cosine", embedding_weight=0.1, ce_weight=0.1,
                               layer_map=(1,))
  opt = train.make_optimizer(cfg)
  # A learned projection of the student's hidden states to the teacher's width.
  proj = (0.1 * np.random.default_rng(3).standard_normal(
      (scfg.hidden_size, tcfg.hidden_size))).astype(np.float32)
  state = train.init_state(sp, opt, proj)
  state_sh = train.state_shardings(state, scfg, mesh, opt)
  teacher_sh = sharding.param_shardings(tcfg, mesh)
  step = train.make_train_step(scfg, tcfg, dcfg, cfg, opt, grad_shardings=state_sh["params"])
  compiled, _ = train.compile_step(step, state_sh, teacher_sh, mesh,
                                   train.abstract(state, state_sh),
                                   train.abstract(tp, teacher_sh), cfg)

  rng = np.random.default_rng(1)
  g, t = cfg.global_batch_size, cfg.seq_len
  rows = {"tokens": rng.integers(3, tcfg.vocab_size, (g, t)),
          # Two documents per row, the second starting at a row-dependent place.
          "segment_ids": np.where(np.arange(t)[None] < rng.integers(4, t, (g, 1)), 1, 2)}
  starts = np.argmax(rows["segment_ids"] == 2, axis=1)[:, None]
  rows["positions"] = np.where(rows["segment_ids"] == 1, np.arange(t)[None],
                               np.arange(t)[None] - starts)
  index, count = train.batch_rows(mesh, cfg)
  per = g // count
  local = {k: v[index * per:(index + 1) * per] for k, v in rows.items()}
  new, metrics = compiled(train.put_global(state, state_sh), train.put_global(tp, teacher_sh),
                          train.global_batch(local, mesh, cfg))
  params = jax.tree_util.tree_map(
      lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
      if jax.process_count() > 1 else np.asarray(x), new["params"])
  out = _flat(params, "distill/params/")
  out.update({f"distill/metrics/{k}": np.asarray(v) for k, v in metrics.items()})
  return out


def results(mesh_spec: str | None) -> dict[str, np.ndarray]:
  """The three stages on `mesh_spec` over every device of every process (None: plain arrays
  on one device, and a one-device mesh for the training step)."""
  import jax

  from minitron_jax import config, sharding
  from minitron_jax.evaluate import scoring
  from minitron_jax.prune import importance as I

  tcfg = config.preset("tiny")  # V 256, D 64, F 128, L 2, N 4, K 2, H 16
  scfg = tcfg.replace(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
  tp, sp = _init(tcfg, 0), _init(scfg, 1)
  mesh = sharding.stage_mesh(mesh_spec)
  out = distill_step(tp, tcfg, sp, scfg,
                     mesh or sharding.make_mesh("data:1", jax.devices()[:1]))
  rng = np.random.default_rng(2)
  # 6 rows do not divide the 4 batch shards: the padding rows must count for nothing.
  batches = [rng.integers(3, tcfg.vocab_size, (6, 24)).astype(np.int32) for _ in range(2)]
  scores = I.activation_scores(tp, tcfg, batches, I.Aggregation.parse("l2,mean"), mesh=mesh)
  out.update(scores.to_npz_dict("importance/"))
  ids = rng.integers(3, tcfg.vocab_size, 7 * 32 + 5)
  ppl = scoring.perplexity(tp, tcfg, ids, seq_len=32, batch_size=3, progress=False, mesh=mesh)
  out["ppl/window_nll"] = np.asarray(ppl["window_nll"])
  out["ppl/nll"] = np.asarray(ppl["nll"])
  return {k: np.asarray(v, np.float64) for k, v in out.items()}


def worker(spec: dict) -> None:
  import jax

  if spec.get("coordinator"):
    jax.distributed.initialize(coordinator_address=spec["coordinator"],
                               num_processes=spec["num_processes"],
                               process_id=spec["process_id"])
  out = results(spec.get("mesh"))
  out["devices"] = np.float64(jax.device_count())
  out["processes"] = np.float64(jax.process_count())
  np.savez(os.path.join(spec["out"], f"process_{jax.process_index()}.npz"), **out)


# ---------------------------------------------------------------------------- test side


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(spec: dict, devices: int, log_path: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
  with open(log_path, "w") as log:  # the child holds its own descriptor
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(spec)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, str]) -> None:
  deadline = time.time() + TIMEOUT_S
  try:
    for p in procs.values():
      p.wait(timeout=max(deadline - time.time(), 1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
  failed = {k: p.returncode for k, p in procs.items() if p.returncode != 0}
  if failed:
    text = "\n".join(f"--- {k}\n{Path(logs[k]).read_text()[-3000:]}" for k in failed)
    pytest.fail(f"worker(s) failed {failed}:\n{text}")


def _gloo_available() -> bool:
  import jax

  return hasattr(jax._src.lib._jax, "make_gloo_tcp_collectives")


def test_two_processes_on_one_mesh_equal_one_device(tmp_path):
  if not _gloo_available():
    pytest.skip("this jaxlib has no gloo CPU collectives: two CPU processes cannot share "
                "a mesh")
  one, two = tmp_path / "one", tmp_path / "two"
  one.mkdir()
  two.mkdir()
  coordinator = f"127.0.0.1:{_free_port()}"
  logs = {"one": str(one / "log.txt"),
          **{f"process_{i}": str(two / f"log{i}.txt") for i in range(2)}}
  procs = {f"process_{i}": _start({"mesh": MESH, "out": str(two), "coordinator": coordinator,
                                   "num_processes": 2, "process_id": i}, 4,
                                  logs[f"process_{i}"]) for i in range(2)}
  procs["one"] = _start({"mesh": None, "out": str(one)}, 1, logs["one"])
  _wait_all(procs, logs)

  ref = dict(np.load(one / "process_0.npz"))
  assert (ref.pop("devices"), ref.pop("processes")) == (1, 1)
  # The stages are all there and their numbers are not trivially equal (e.g. all zeros).
  for key in ("distill/metrics/distill/kl", "distill/metrics/distill/hidden",
              "distill/params/model/layers/down", "importance/heads",
              "importance/channels", "ppl/window_nll"):
    assert key in ref and np.all(np.isfinite(ref[key])), key
  for key in ("distill/metrics/distill/kl", "distill/metrics/train/grad_norm"):
    assert ref[key] > 0, key
  for key in ("importance/heads", "importance/channels", "ppl/window_nll"):
    assert np.ptp(ref[key]) > 0, key
  for i in range(2):
    got = dict(np.load(two / f"process_{i}.npz"))
    assert (got.pop("devices"), got.pop("processes")) == (8, 2)
    assert got.keys() == ref.keys()
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], rtol=TOL, atol=TOL,
                                 err_msg=f"process {i}: {k}")


if __name__ == "__main__":
  worker(json.loads(sys.argv[1]))
