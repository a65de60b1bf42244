"""Distillation step cost: the fused step (teacher forward + student forward/backward + update,
one jitted function) against its parts run alone -- a cross-entropy step of the student and a
jitted teacher forward on the same batch -- with tokens/s and model FLOPs utilisation (MFU).

The teacher is SmolLM2-135M; the student is its width-pruned copy (hidden and MLP sizes of
`configs/base.py`, channels ranked by weight magnitude and sliced with `prune.prune`). The
fused step is worth having when it costs no more than its parts: the summary prints
`distill / (ce + teacher fwd)` per dtype and, last, the worst of them against a target of 1.1x.

Model FLOPs are counted analytically, per token of a row of T tokens, for a config with L
layers, hidden D, MLP F, N query / K KV heads of size H and vocabulary V:

  forward(cfg) = 2 * L * (D*H*(2N + 2K) + 3*D*F)   q/k/v/o and gate/up/down matmuls
               + 4 * L * T * N * H                  attention scores and values (the full T x T,
                                                    as computed; no causal discount)
               + 2 * D * V                          LM head (tied or not; it dominates a small
                                                    model with a 49k vocabulary)

  CE train step      = 3 * forward(student)  (backward = 2x forward: the usual 6N + 12*L*T*N*H)
  teacher forward    = forward(teacher)
  distillation step  = 3 * forward(student) + forward(teacher)

Embedding gathers, norms, softmax / KL and the optimizer are not counted; neither is the
recomputation of remat (model FLOPs, not hardware FLOPs, so remat only lowers MFU). MFU is the
achieved model FLOP/s over a peak measured in this run: the best time of a jitted N x N x N
matmul in each compute dtype on this machine (attainable, not datasheet, peak).

XLA's `cost_analysis()` counts a while loop's body once, so on the full models it sees one of
the L layers of the `lax.scan`. The formula is therefore cross-checked against XLA on one-layer
copies of both models (same widths, batch and vocabulary), where XLA counts every op once;
XLA also counts the elementwise work left out above, so it should come out a little higher.

  python benchmarks/distill.py --batch=4 --seq_len=256 --repeats=3
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import base  # noqa: E402
from minitron_jax import cli, flops, model as M, sharding  # noqa: E402
from minitron_jax.io import hf as hf_io  # noqa: E402
from minitron_jax.distill import losses as distill  # noqa: E402
from minitron_jax.prune import importance  # noqa: E402
from minitron_jax.prune import slicing as prune  # noqa: E402
from minitron_jax.distill import step as train  # noqa: E402
from benchmarks.timing import best_seconds  # noqa: E402

_WIDTH = base.get_config().prune.width
TARGET = 1.1

_MODEL = flags.DEFINE_string("model_dir", "smollm2-135m", "Teacher directory or short name.")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows per step.", lower_bound=1)
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per row.", lower_bound=2)
_HIDDEN = flags.DEFINE_integer("hidden_size", _WIDTH.hidden_size, "Student hidden size.",
                               lower_bound=1)
_MLP = flags.DEFINE_integer("intermediate_size", _WIDTH.intermediate_size,
                            "Student MLP width.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps per row (best is kept).",
                                lower_bound=1)
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to compare.")
_REMAT = flags.DEFINE_bool("remat", True, "Also time the distillation step with remat.")
_PEAK_N = flags.DEFINE_integer("peak_n", 2048, "Size of the square matmul timed for the peak.",
                               lower_bound=64)
_MESH = flags.DEFINE_string("mesh", "data:-1", "Device mesh.")


# ---------------------------------------------------------------------------- FLOPs


def forward_flops_per_token(cfg, seq_len: int) -> int:
  """Model FLOPs of one forward pass per token (see the module docstring)."""
  return flops.forward_flops(cfg, 1, seq_len) // seq_len


def step_flops(kind: str, scfg, tcfg, tokens: int, seq_len: int) -> int:
  """Model FLOPs of one step of `kind` ("ce", "teacher", "distill") over `tokens` tokens."""
  student = 3 * forward_flops_per_token(scfg, seq_len)
  teacher = forward_flops_per_token(tcfg, seq_len)
  return tokens * {"ce": student, "teacher": teacher, "distill": student + teacher}[kind]


def xla_flops(compiled) -> float:
  """XLA's own FLOP count of a compiled computation (NaN where the backend has none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # not every backend implements it
    return float("nan")
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def matmul_peak(dtype: str, n: int, repeats: int = 5) -> float:
  """Best FLOP/s of a jitted (n, n) @ (n, n) matmul in `dtype`."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  f = jax.jit(jnp.matmul)
  return 2 * n ** 3 / best_seconds(lambda: f(a, b), repeats)


# ---------------------------------------------------------------------------- timing


def temp_gib(mem) -> float:
  """Temporaries of a compiled computation in GiB (NaN where the backend does not say)."""
  return getattr(mem, "temp_size_in_bytes", float("nan")) / 1024 ** 3 if mem else float("nan")


def run_config(dtype, remat, kind, b, t):
  mode = "distill" if kind == "distill" else "teacher_correction"
  return train.TrainConfig(mode=mode, steps=100, global_batch_size=b, seq_len=t, dtype=dtype,
                           remat=remat, mesh=_MESH.value)


def _abstract_params(cfg):
  """float32 parameter shapes of `cfg`, without allocating them."""
  return jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))


def compile_train_step(cfg, scfg, tcfg, tparams, mesh):
  """(compiled step, memory analysis, state init, state shardings, teacher shardings)."""
  opt = train.make_optimizer(cfg)
  distilling = cfg.mode == "distill"
  shape = jax.eval_shape(lambda p: train.init_state(p, opt), _abstract_params(scfg))
  state_sh = train.state_shardings(shape, scfg, mesh, opt)
  teacher_sh = sharding.param_shardings(tcfg, mesh, params=tparams) if distilling else None
  step = train.make_train_step(scfg, tcfg if distilling else None,
                               distill.DistillConfig() if distilling else None, cfg, opt)
  compiled, mem = train.compile_step(step, state_sh, teacher_sh, mesh,
                                     train.abstract(shape, state_sh),
                                     train.abstract(tparams, teacher_sh) if distilling else None,
                                     cfg)
  init = jax.jit(lambda p: train.init_state(p, opt), out_shardings=state_sh)
  return compiled, mem, init, state_sh, teacher_sh


def time_train_step(cfg, scfg, sparams, tcfg, tparams, mesh, batch, repeats):
  """(best seconds per step, temporaries GiB) of one compiled train step."""
  compiled, mem, init, state_sh, teacher_sh = compile_train_step(cfg, scfg, tcfg, tparams, mesh)
  state = init(train.put_global(sparams, state_sh["params"]["model"]))
  teacher = train.put_global(tparams, teacher_sh) if teacher_sh is not None else None
  holder = {"state": state}

  def one():
    holder["state"], metrics = compiled(holder["state"], teacher, batch)
    return metrics

  sec = best_seconds(one, repeats)
  return sec, temp_gib(mem)


def teacher_forward(tcfg, dtype):
  """The teacher's forward alone, as the fused step runs it (packed-batch inputs, logits)."""
  cfg = tcfg.replace(dtype=dtype)
  return jax.jit(lambda p, mb: M.forward(p, cfg, mb["tokens"], positions_bt=mb["positions"],
                                         segment_ids_bt=mb["segment_ids"])["logits"])


def time_teacher(tcfg, tparams, mesh, local, dtype, repeats):
  """(best seconds per forward, temporaries GiB) of the jitted teacher forward."""
  params = train.put_global(tparams, sharding.param_shardings(tcfg, mesh, params=tparams))
  row = sharding.batch_sharding(mesh)
  mb = {k: train.put_global(v, row) for k, v in local.items()}
  compiled = teacher_forward(tcfg, dtype).lower(params, mb).compile()
  sec = best_seconds(lambda: compiled(params, mb), repeats)
  mem = compiled.memory_analysis()
  return sec, temp_gib(mem)


def xla_check(scfg, tcfg, mesh, b, t):
  """{kind: (analytic FLOPs, XLA FLOPs)} on one-layer copies of both models, float32."""
  s1, t1 = scfg.keep_layers([0]), tcfg.keep_layers([0])
  t1_params = _abstract_params(t1)
  out = {}
  for kind in ("ce", "distill"):
    compiled = compile_train_step(run_config("float32", False, kind, b, t), s1, t1, t1_params,
                                  mesh)[0]
    out[kind] = (step_flops(kind, s1, t1, b * t, t), xla_flops(compiled))
  mb = {k: jax.ShapeDtypeStruct((b, t), jnp.int32) for k in ("tokens", "positions",
                                                             "segment_ids")}
  compiled = teacher_forward(t1, "float32").lower(t1_params, mb).compile()
  out["teacher"] = (step_flops("teacher", s1, t1, b * t, t), xla_flops(compiled))
  return out


# ---------------------------------------------------------------------------- main


@cli.main_wrapper
def main(argv):
  del argv
  tparams, tcfg, _, path = hf_io.load_model(_MODEL.value, "float32", with_tokenizer=False)
  tparams = jax.device_get(tparams)
  plan = prune.make_plan(tcfg, prune.Targets(hidden_size=_HIDDEN.value,
                                             intermediate_size=_MLP.value),
                         importance.magnitude_scores(tparams, tcfg))
  sparams, scfg = prune.prune(tparams, tcfg, plan)
  mesh = sharding.make_mesh(_MESH.value)
  b, t, repeats = _BATCH.value, _SEQ.value, _REPEATS.value
  tokens = b * t
  rng = np.random.default_rng(0)
  local = {"tokens": rng.integers(3, tcfg.vocab_size, (b, t)).astype(np.int32),
           "segment_ids": np.ones((b, t), np.int32),
           "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}
  print(f"teacher {path}: {tcfg.num_params() / 1e6:.1f}M params; student hidden "
        f"{scfg.hidden_size}, mlp {scfg.intermediate_size}: {scfg.num_params() / 1e6:.1f}M; "
        f"batch {b}x{t}; devices {jax.devices()[0].platform} x{jax.device_count()}; "
        f"load average {os.getloadavg()[0]:.2f}")

  peaks = {dt: matmul_peak(dt, _PEAK_N.value) for dt in _DTYPES.value}
  print("measured peak (jitted {0}x{0}x{0} matmul, best of 5): ".format(_PEAK_N.value)
        + ", ".join(f"{dt} {p / 1e12:.3f} TFLOP/s" for dt, p in peaks.items()))

  header = (f"{'dtype':9} {'step':16} {'remat':5} {'s/step':>8} {'tok/s':>8} "
            f"{'TFLOP/s':>8} {'MFU':>6} {'temp GiB':>8}")
  print("\nMFU = model FLOP/s / measured matmul peak of the row's dtype\n" + header)
  print("-" * len(header))
  results = {}
  for dtype in _DTYPES.value:
    rows = [("ce", False), ("teacher", False), ("distill", False)]
    rows += [("distill", True)] if _REMAT.value else []
    for kind, remat in rows:
      if kind == "teacher":
        sec, temp = time_teacher(tcfg, tparams, mesh, local, dtype, repeats)
      else:
        cfg = run_config(dtype, remat, kind, b, t)
        sec, temp = time_train_step(cfg, scfg, sparams, tcfg, tparams, mesh,
                                    train.global_batch(local, mesh, cfg), repeats)
      results[(dtype, kind, remat)] = sec
      rate = step_flops(kind, scfg, tcfg, tokens, t) / sec
      name = {"ce": "ce (student)", "teacher": "teacher fwd", "distill": "distill (fused)"}[kind]
      print(f"{dtype:9} {name:16} {str(remat):5} {sec:8.3f} {tokens / sec:8.0f} "
            f"{rate / 1e12:8.4f} {rate / peaks[dtype]:6.1%} {temp:8.2f}", flush=True)

  print(f"\nmodel GFLOP per step: ce {step_flops('ce', scfg, tcfg, tokens, t) / 1e9:.1f}, "
        f"teacher fwd {step_flops('teacher', scfg, tcfg, tokens, t) / 1e9:.1f}, "
        f"distill {step_flops('distill', scfg, tcfg, tokens, t) / 1e9:.1f}")
  print("cross-check on one-layer copies (XLA counts a scan body once), float32:")
  for kind, (ours, xla) in xla_check(scfg, tcfg, mesh, b, t).items():
    print(f"  {kind:8} analytic {ours / 1e9:8.2f} GFLOP, XLA {xla / 1e9:8.2f} GFLOP, "
          f"XLA / analytic {xla / ours:.3f}")
  after = {dt: matmul_peak(dt, _PEAK_N.value) for dt in _DTYPES.value}
  print("peak re-measured at the end: "
        + ", ".join(f"{dt} {p / 1e12:.3f} TFLOP/s" for dt, p in after.items())
        + f"; load average {os.getloadavg()[0]:.2f}")

  print()
  worst = 0.0
  for dtype in _DTYPES.value:
    ce, tf, kd = (results[(dtype, k, False)] for k in ("ce", "teacher", "distill"))
    ratio = kd / (ce + tf)
    worst = max(worst, ratio)
    line = (f"{dtype}: distill {kd:.3f}s / (ce {ce:.3f}s + teacher fwd {tf:.3f}s) = "
            f"{ratio:.2f}x; distill / ce {kd / ce:.2f}x")
    if _REMAT.value:
      line += f"; remat / no remat {results[(dtype, 'distill', True)] / kd:.2f}x"
    print(line)
  if len(_DTYPES.value) > 1:
    print("verdict on the worst dtype:")
  print(f"distill / (ce + teacher fwd) = {worst:.2f}x (target <= {TARGET}x): "
        f"{'met' if worst <= TARGET else 'not met'}")


if __name__ == "__main__":
  app.run(main)
