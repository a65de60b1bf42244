"""Train-step throughput: a distillation step (teacher forward + student forward/backward)
against a plain cross-entropy step on the same student, with and without remat, side by side.

The student is the teacher cut to a fraction of its width (the first channels of every
`embed` / `mlp` axis): the right shapes for a pruned student, without running a pruning.

  python benchmarks/distill.py --model_dir=smollm2-135m --batch=4 --seq_len=256
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from minitron_jax import axes, cli, distill, sharding, train  # noqa: E402

_MODEL = flags.DEFINE_string("model_dir", "smollm2-135m", "Teacher directory or short name.")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows per step.", lower_bound=1)
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per row.", lower_bound=2)
_WIDTH = flags.DEFINE_float("width", 0.75, "Student hidden width as a fraction of the teacher's.",
                            lower_bound=0.05, upper_bound=1.0)
_MLP = flags.DEFINE_float("mlp_width", 0.5, "Student MLP width as a fraction.", lower_bound=0.05,
                          upper_bound=1.0)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps (best is kept).", lower_bound=1)
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to compare.")
_MESH = flags.DEFINE_string("mesh", "data:-1", "Device mesh.")


def narrow(params, cfg, hidden, mlp):
  """The first `hidden` / `mlp` fractions of the embed / mlp channels of every parameter."""
  keep = {axes.EMBED: int(cfg.hidden_size * hidden), axes.MLP: int(cfg.intermediate_size * mlp)}
  leaves = []
  for spec in axes.param_specs(cfg):
    x = np.asarray(jax.device_get(axes.get(params, spec)))
    for i, name in enumerate(spec.axes):
      if name in keep:
        x = np.take(x, np.arange(keep[name]), axis=i)
    leaves.append((spec, x))
  return axes.tree_from_leaves(leaves), cfg.replace(hidden_size=keep[axes.EMBED],
                                                    intermediate_size=keep[axes.MLP])


def time_step(tcfg_run, scfg, sparams, tcfg, tparams, mesh, batch, repeats):
  """(best seconds per step, temporaries GiB) of one compiled step."""
  opt = train.make_optimizer(tcfg_run)
  distilling = tcfg_run.mode == "distill"
  shape = jax.eval_shape(lambda p: train.init_state(p, opt), sparams)
  state_sh = train.state_shardings(shape, scfg, mesh, opt)
  teacher_sh = sharding.param_shardings(tcfg, mesh, params=tparams) if distilling else None
  step = train.make_train_step(scfg, tcfg if distilling else None,
                               distill.DistillConfig() if distilling else None, tcfg_run, opt)
  compiled, mem = train.compile_step(step, state_sh, teacher_sh, mesh,
                                     train.abstract(shape, state_sh),
                                     train.abstract(tparams, teacher_sh) if distilling else None,
                                     tcfg_run)
  state = jax.jit(lambda p: train.init_state(p, opt), out_shardings=state_sh)(
      train.put_global(sparams, state_sh["params"]["model"]))
  teacher = train.put_global(tparams, teacher_sh) if distilling else None
  best = float("inf")
  for i in range(repeats + 1):  # the first call also pays for allocation; not counted
    t0 = time.perf_counter()
    state, metrics = compiled(state, teacher, batch)
    jax.block_until_ready(metrics)
    if i:
      best = min(best, time.perf_counter() - t0)
  temp = getattr(mem, "temp_size_in_bytes", float("nan")) / 1024 ** 3 if mem else float("nan")
  return best, temp


@cli.main_wrapper
def main(argv):
  del argv
  tparams, tcfg, _, path = cli.load_model(_MODEL.value, "float32", with_tokenizer=False)
  tparams = jax.device_get(tparams)
  sparams, scfg = narrow(tparams, tcfg, _WIDTH.value, _MLP.value)
  mesh = sharding.make_mesh(_MESH.value)
  b, t = _BATCH.value, _SEQ.value
  rng = np.random.default_rng(0)
  local = {"tokens": rng.integers(3, tcfg.vocab_size, (b, t)).astype(np.int32),
           "segment_ids": np.ones((b, t), np.int32),
           "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}
  print(f"teacher {path}: {tcfg.num_params() / 1e6:.1f}M params; student hidden "
        f"{scfg.hidden_size}, mlp {scfg.intermediate_size}: {scfg.num_params() / 1e6:.1f}M; "
        f"batch {b}x{t}; devices "
        f"{jax.devices()[0].platform} x{jax.device_count()}")
  header = f"{'dtype':9} {'step':10} {'remat':5} {'s/step':>8} {'tok/s':>9} {'temp GiB':>9}"
  print(header + "\n" + "-" * len(header))
  results = {}
  for dtype in _DTYPES.value:
    for mode, remat in (("ce", False), ("distill", False), ("distill", True)):
      cfg = train.TrainConfig(mode="distill" if mode == "distill" else "teacher_correction",
                              steps=100, global_batch_size=b, seq_len=t, dtype=dtype,
                              remat=remat, mesh=_MESH.value)
      batch = train.global_batch(local, mesh, cfg)
      sec, temp = time_step(cfg, scfg, sparams, tcfg, tparams, mesh, batch, _REPEATS.value)
      results[(dtype, mode, remat)] = sec
      print(f"{dtype:9} {mode:10} {str(remat):5} {sec:8.2f} {b * t / sec:9.0f} {temp:9.2f}",
            flush=True)
  print()
  for dtype in _DTYPES.value:
    ce, kd, kd_remat = (results[(dtype, "ce", False)], results[(dtype, "distill", False)],
                        results[(dtype, "distill", True)])
    print(f"{dtype}: distill / CE step time {kd / ce:.2f}x (tokens/s ratio {ce / kd:.2f}); "
          f"remat / no remat {kd_remat / kd:.2f}x")


if __name__ == "__main__":
  app.run(main)
