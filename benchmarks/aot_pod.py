"""Proof by compilation: a recipe's stages compiled for a real TPU slice, without a TPU.

  pip install "jax[tpu]==<installed jax>"    # brings libtpu; harmless on a CPU-only machine
  python benchmarks/aot_pod.py --config=configs/llama31_8b_to_4b_width.py --topology=v5p-64

For the topology (`v5p-64`, `v5e-256`, or libtpu's `v5p:2x4x4`), libtpu describes the chips;
the distillation step (teacher and student at the recipe's sizes, sequence length and
micro-batch, gradient accumulation to the global batch), the importance step, the evaluation
step and generation (prefill and decode) of the teacher are compiled from abstract inputs
with the shardings the recipe uses (`benchmarks/aot.py`). Per stage it prints per-chip
arguments / temporaries / outputs against the chip's HBM, compiled FLOPs against the analytic
count (`minitron_jax.flops`), and a roofline time and MFU from the chip's peak bf16 FLOP/s and
HBM bandwidth; the same as JSON in --output_json. Results are cached there per stage and
settings: a re-run compiles only what changed (--recompile forces all).

The teacher's stages (importance, evaluation, generation) are the same for the width and the
depth recipe; the students' evaluation and generation are smaller than the teacher's.
"""

import os
import sys

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the topology, run nothing
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from minitron_jax import cli, config as C, sharding  # noqa: E402
from minitron_jax.prune.slicing import Targets  # noqa: E402
from benchmarks import aot  # noqa: E402

# The settings the compile proof used, per slice (docs/pod-scale.md).
PLANS = {
    "v5p-64": dict(mesh="fsdp:-1", micro_batch_size=32, remat=True),
    "v5e-256": dict(mesh="fsdp:-1,tensor:8", micro_batch_size=32, remat=True),
}
STAGES = ("distill", "importance", "evaluate", "generate")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config (configs/*.py).")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-64", "TPU slice: v5p-64, v5e-256, v5p:2x4x4.")
_MESH = flags.DEFINE_string("mesh", None, "Device mesh (default: the slice's plan).")
_MICRO = flags.DEFINE_integer("micro_batch_size", None,
                              "Distillation rows per micro-batch, global (default: the plan).",
                              lower_bound=1)
_REMAT = flags.DEFINE_bool("remat", None, "Rematerialise layers in the backward pass.")
_STAGES = flags.DEFINE_list("stages", list(STAGES), f"Any of {', '.join(STAGES)}.")
_PROMPT = flags.DEFINE_integer("prompt_len", 1024, "Generation prompt bucket.", lower_bound=1)
_OUT = flags.DEFINE_string("output_json", None,
                           "Results (default: runs/aot/<config>-<topology>.json).")
_RECOMPILE = flags.DEFINE_bool("recompile", False, "Ignore cached results.")
_MEASURE = flags.DEFINE_bool("measure_flops", True,
                             "Also measure compiled FLOPs (compiles each stage at depth 1 and "
                             "2 with scans unrolled: two or three more compiles per stage).")


def models(c) -> tuple[C.LlamaConfig, C.LlamaConfig, str]:
  """(teacher, student, student name) of a recipe config: the teacher from the known presets,
  the student through the prune run's own target checks."""
  name = {"meta-llama/Llama-3.1-8B": "llama3.1-8b"}.get(c.teacher, c.teacher)
  teacher = C.preset(name)
  kind = c.prune.kinds[0]
  student = Targets.from_flags(teacher, **dict(c.prune[kind])).validate(teacher)
  return teacher, student, f"{student.num_params() / 1e9:.1f}B {kind} student"


def main(argv):
  del argv
  c = _CONFIG.value
  if c is None:
    raise ValueError("--config is required (e.g. configs/llama31_8b_to_4b_width.py)")
  unknown = set(_STAGES.value) - set(STAGES)
  if unknown:
    raise ValueError(f"--stages: unknown {sorted(unknown)}; known: {', '.join(STAGES)}")
  if not aot.libtpu_available():
    raise ValueError('libtpu is not installed: pip install "jax[tpu]==<installed jax version>"')
  plan = dict(PLANS.get(_TOPOLOGY.value, PLANS["v5p-64"]))
  for key, flag in (("mesh", _MESH), ("micro_batch_size", _MICRO), ("remat", _REMAT)):
    if flag.value is not None:
      plan[key] = flag.value
  chip, devices = aot.topology_devices(_TOPOLOGY.value)
  mesh = sharding.make_mesh(plan["mesh"], devices)
  mesh_spec = ",".join(f"{k}:{v}" for k, v in mesh.shape.items() if v > 1)
  teacher, student, student_name = models(c)
  teacher_name = f"{teacher.num_params() / 1e9:.2g}B teacher"
  global_batch, micro = c.distill.global_batch_size, plan["micro_batch_size"]
  if global_batch % micro:
    raise ValueError(f"--micro_batch_size={micro} does not divide the recipe's global batch "
                     f"{global_batch}")
  distill_plan = aot.DistillPlan(micro, global_batch // micro, c.distill.seq_len, plan["remat"])

  config_name = os.path.splitext(os.path.basename(
      config_flags.get_config_filename(flags.FLAGS["config"])))[0]
  out = _OUT.value or os.path.join("runs", "aot", f"{config_name}-{_TOPOLOGY.value}.json")
  cached = {}
  if os.path.isfile(out) and not _RECOMPILE.value:
    with open(out) as f:
      cached = json.load(f).get("stages", {})
  print(f"{_TOPOLOGY.value}: {len(devices)} x {chip.name} ({chip.hbm_bytes / aot.GIB:.0f} GiB, "
        f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bandwidth / 1e9:.0f} GB/s); "
        f"mesh {mesh_spec}; teacher {teacher.num_params() / 1e9:.2f}B, {student_name}",
        flush=True)

  def compiled(event, seconds, **kw):  # progress: the compiles run minutes each
    if event.endswith("backend_compile_duration") and seconds > 10:
      print(f"  an XLA compile took {seconds:.0f} s", flush=True)
  jax.monitoring.register_event_duration_secs_listener(compiled)

  jobs = {
      "distill": lambda: [aot.distill_report(student, teacher, student_name, mesh, mesh_spec,
                                             chip, distill_plan, _MEASURE.value)],
      "importance": lambda: [aot.forward_report(
          "importance", teacher, teacher_name, mesh, mesh_spec, chip,
          sharding.padded_rows(c.prune.batch_size, mesh), c.prune.calib_seq_len,
          _MEASURE.value)],
      "evaluate": lambda: [aot.forward_report(
          "evaluate", teacher, teacher_name, mesh, mesh_spec, chip,
          sharding.padded_rows(c.eval.batch_size, mesh), c.eval.seq_len, _MEASURE.value)],
      "generate": lambda: aot.generate_reports(
          teacher, teacher_name, mesh, mesh_spec, chip,
          sharding.padded_rows(len(c.generate.prompts), mesh), _PROMPT.value,
          c.generate.max_new_tokens, _MEASURE.value),
  }
  reports = []
  for stage in _STAGES.value:
    key = f"{stage}|{mesh_spec}|{distill_plan if stage == 'distill' else ''}"
    if key in cached and (cached[key][0]["compiled_flops"] is not None or not _MEASURE.value):
      reports += [_from_json(r) for r in cached[key]]
      continue
    t0 = time.perf_counter()
    got = jobs[stage]()
    print(f"compiled {stage} in {time.perf_counter() - t0:.0f} s", flush=True)
    cached[key] = [r.to_json() for r in got]
    reports += got
    _write(out, _TOPOLOGY.value, config_name, cached)
  print(aot.format_table(reports))
  for r in reports:
    if r.notes:
      print(f"- {r.stage}: {r.notes}")
  print(f"wrote {out}")


def _from_json(d: dict) -> aot.StageReport:
  fields = {f.name for f in aot.dataclasses.fields(aot.StageReport)}
  d = {k: v for k, v in d.items() if k in fields}
  d["memory"] = aot.Memory(**d["memory"])
  return aot.StageReport(**d)


def _write(path: str, topology: str, config_name: str, stages: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"topology": topology, "config": config_name, "stages": stages}, f, indent=1)
  os.replace(tmp, path)


if __name__ == "__main__":
  app.run(cli.main_wrapper(main), flags_parser=cli.flags_parser)
