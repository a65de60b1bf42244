"""Distil a pruned student from its teacher, or correct the teacher, and export HF.

  python launch/distill.py --teacher_dir=smollm2-135m --student_dir=runs/pruned \
      --output_dir=runs/distill --steps=400 --global_batch_size=32 --micro_batch_size=8 \
      --seq_len=1024 --hidden_loss=cosine

  python launch/distill.py --mode=teacher_correction --teacher_dir=smollm2-135m \
      --output_dir=runs/corrected --steps=100

Offline teacher logits: write the teacher's top-K logits of a run's batches once (same data,
steps, batch, seq_len and seed as the runs that will read it), then distil from them without
the teacher in memory:

  python launch/distill.py --teacher_dir=smollm2-135m --output_dir=unused --data=wikitext2 \
      --steps=28 --global_batch_size=8 --seq_len=256 --teacher_cache=cache --cache_teacher_topk=64
  python launch/distill.py --teacher_dir=smollm2-135m --student_dir=runs/pruned \
      --output_dir=runs/distill --data=wikitext2 --steps=28 --global_batch_size=8 \
      --seq_len=256 --teacher_cache=cache

Re-running the same command resumes from the latest checkpoint in --output_dir. Multi-host:
run it on every host with --coordinator_address=HOST:PORT --num_processes=N --process_id=I
(or from a cluster environment that jax.distributed reads).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from minitron_jax import cli  # noqa: E402
from minitron_jax.config import ATTENTION_IMPLS  # noqa: E402
from minitron_jax.distill import losses as distill  # noqa: E402
from minitron_jax.distill import run as trainer  # noqa: E402
from minitron_jax.distill.step import TrainConfig  # noqa: E402

_TEACHER = flags.DEFINE_string("teacher_dir", "smollm2-135m",
                               "Teacher: HF directory, known short name, or hub id.")
_STUDENT = flags.DEFINE_string("student_dir", None, "Student to distil (HF directory or name).")
_OUT = flags.DEFINE_string("output_dir", None, "Checkpoints, metrics, plot and the HF export.")
_MODE = flags.DEFINE_enum("mode", "distill", ["distill", "teacher_correction"],
                          "distill: train the student; teacher_correction: fine-tune the "
                          "teacher alone with cross-entropy.")
_DATA = flags.DEFINE_string("data", "shakespeare", "Training corpus: file, directory, glob, hub "
                            "dataset name[:config], or the bundled 'shakespeare'.")
_EVAL_DATA = flags.DEFINE_string("eval_data", None, "Held-out corpus (default: the tail of "
                                 "--data, excluded from training).")
_STEPS = flags.DEFINE_integer("steps", 100, "Optimizer updates.", lower_bound=1)
_GBS = flags.DEFINE_integer("global_batch_size", 8, "Rows per update (all hosts).",
                            lower_bound=1)
_MBS = flags.DEFINE_integer("micro_batch_size", None, "Rows per forward pass (all hosts); "
                            "gradients of global/micro passes are accumulated.", lower_bound=1)
_SEQ = flags.DEFINE_integer("seq_len", 512, "Tokens per row.", lower_bound=2)
_LR = flags.DEFINE_float("lr", 1e-4, "Peak learning rate.")
_MIN_LR = flags.DEFINE_float("min_lr", 1e-5, "Final learning rate of the cosine decay.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 40, "Linear warmup updates.", lower_bound=0)
_WD = flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay of matrices.")
_CLIP = flags.DEFINE_float("grad_clip", 1.0, "Global gradient-norm clip (0 = off).")
_MESH = flags.DEFINE_string("mesh", "data:-1", "Device mesh, e.g. data:2,fsdp:2,tensor:2.")
_TEMP = flags.DEFINE_float("kd_temperature", 1.0, "Softmax temperature of the logit KL.")
_KL = flags.DEFINE_enum("kd_loss", "forward", list(distill.KL_KINDS),
                        "forward = KL(teacher||student), reverse = KL(student||teacher).")
_TOPK = flags.DEFINE_integer("kd_top_k", None, "Use only the teacher's top-k logits.",
                             lower_bound=1)
_HIDDEN = flags.DEFINE_enum("hidden_loss", "none", list(distill.HIDDEN_LOSSES),
                            "Hidden-state loss between mapped layers.")
_HIDDEN_W = flags.DEFINE_float("hidden_weight", None, "Weight of the hidden loss (default: "
                               "dynamic, L_logits / L_hidden).")
_EMB_W = flags.DEFINE_float("embedding_weight", 0.0, "Weight of the embedding-output loss.")
_CE_W = flags.DEFINE_float("ce_weight", 0.0, "Weight of cross-entropy on the data labels.")
_LAYER_MAP = flags.DEFINE_string("layer_map", None, "Teacher layer of each student layer, e.g. "
                                 "0-7,12,16-31 (default: from --prune_report, else identity).")
_REPORT = flags.DEFINE_string("prune_report", None, "The student's pruning report (JSON; "
                              "default: prune_report.json in --student_dir): its kept layers "
                              "are the layer map, its kept embedding channels start the "
                              "hidden-state projection.")
_SAVE = flags.DEFINE_integer("save_every", 100, "Checkpoint every N updates (0 = at the end "
                             "only).", lower_bound=0)
_KEEP = flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints to keep.", lower_bound=1)
_EVAL = flags.DEFINE_integer("eval_every", 50, "Held-out evaluation every N updates (0 = "
                             "never).", lower_bound=0)
_EVAL_WIN = flags.DEFINE_integer("eval_windows", 8, "Held-out windows of seq_len tokens.",
                                 lower_bound=1)
_LOG = flags.DEFINE_integer("log_every", 10, "Console line every N updates.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"],
                           "Compute dtype (parameters stay float32).")
_EXPORT_DTYPE = flags.DEFINE_enum("export_dtype", None, ["float32", "bfloat16", "float16"],
                                  "Dtype of the exported weights (default: the input's).")
_REMAT = flags.DEFINE_bool("remat", False, "Recompute layer activations in the backward pass.")
_CHUNK = flags.DEFINE_integer("logits_chunk", 512, "Tokens per row whose logits exist at once "
                              "in the losses (0 = the whole sequence).", lower_bound=0)
_ATTN = flags.DEFINE_enum("attention_impl", "auto", list(ATTENTION_IMPLS), "Attention kernel: "
                          "auto = splash on TPU, Pallas/cuDNN flash on GPU, XLA on CPU.")
_SEED = flags.DEFINE_integer("seed", 0, "Data order and projection init.")
_COORD = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.",
                              lower_bound=1)
_PID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.",
                            lower_bound=0)
_SCHEDULE = flags.DEFINE_bool("allow_schedule_change", False, "On resume, accept new --steps, "
                              "--lr, --min_lr or --warmup_steps instead of refusing them.")
_CACHE = flags.DEFINE_string("teacher_cache", None, "Directory of offline teacher logits: "
                             "written with --cache_teacher_topk, else read instead of running "
                             "the teacher.")
_CACHE_K = flags.DEFINE_integer("cache_teacher_topk", 0, "Write the teacher's top-K logits of "
                                "this run's batches to --teacher_cache and stop (0 = read).",
                                lower_bound=0)
_CACHE_DTYPE = flags.DEFINE_enum("cache_dtype", "float32", ["float32", "bfloat16"],
                                 "dtype of the cached logits.")
_CRASH = flags.DEFINE_integer("crash_after_save_step", None, "Testing crash recovery: SIGKILL "
                              "the process right after this step's checkpoint is written.")
_QAD = flags.DEFINE_string("qad_format", None, "Quantization-aware distillation: the student's "
                           "linear weights pass through fake quantization in this export format "
                           "(fp8, fp8_channel, fp8_tensor, int8, int4, int4_asym) inside the "
                           "loss, and the result is also exported in it (<output_dir>/quantized)."
                           )
_QAD_GROUP = flags.DEFINE_integer("qad_group_size", 128, "INT4 group size of --qad_format.",
                                  lower_bound=2)
_QAD_METHOD = flags.DEFINE_enum("qad_method", "rtn", ["rtn", "gptq", "awq", "awq_gptq"],
                                "Grid of --qad_format: rtn = round to nearest, re-derived from "
                                "the moving weights at every step; a calibrated method = the "
                                "grid of that method's quantization of the student, frozen, "
                                "training starting from its quantized weights.")
_QAD_CALIB = flags.DEFINE_string("qad_calib_data", None, "Calibration text of --qad_method "
                                 "(default --data).")
_QAD_NCAL = flags.DEFINE_integer("qad_calib_samples", 32, "Calibration windows of --qad_method.",
                                 lower_bound=1)
_QAD_LCAL = flags.DEFINE_integer("qad_calib_seq_len", 512, "Tokens per calibration window.",
                                 lower_bound=2)


def _qad(name: str, grids: list):
  """The student setup of --qad_format (checked before any training): (start params, transform)
  given the student; a calibrated method's frozen grid is appended to `grids` for the export."""
  from minitron_jax.quantize import calibrate
  from minitron_jax.quantize import export as quant_export
  from minitron_jax.quantize import qad

  fmt = qad.check_format(quant_export.export_format(name))
  method = _QAD_METHOD.value
  if not calibrate.applies(method, fmt):
    raise ValueError(f"--qad_method={method} cannot quantize {fmt.value}")

  def setup(params, mcfg, tok):
    quant_export.check_consumers(mcfg, fmt)
    if method == "rtn":
      return params, qad.fake_quant_transform(mcfg, fmt, _QAD_GROUP.value)
    from minitron_jax.data import corpus, packing

    source = _QAD_CALIB.value or _DATA.value
    batches = list(packing.calibration_batches(
        corpus.load_tokens(source, tok), num_samples=_QAD_NCAL.value,
        seq_len=_QAD_LCAL.value, batch_size=8))
    print(f"calibrating the {name} grid by {method} on {source}", flush=True)
    quantized = calibrate.calibrated_params(params, mcfg, fmt, batches, method,
                                            group_size=_QAD_GROUP.value, progress=True)
    grid = qad.FrozenGrid(quantized, mcfg)
    grids.append(grid)
    return grid.start_params(), grid.transform()

  return setup


@cli.main_wrapper
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  if not _OUT.value:
    raise ValueError("--output_dir is required")
  layer_map = distill.parse_layer_map(_LAYER_MAP.value) if _LAYER_MAP.value else None
  if (_QAD_METHOD.value != "rtn" or _QAD_CALIB.value) and not _QAD.value:
    raise ValueError("--qad_method and --qad_calib_data need --qad_format")
  if _QAD_CALIB.value and _QAD_METHOD.value == "rtn":
    raise ValueError("--qad_calib_data is for a calibrated --qad_method (gptq, awq, awq_gptq)")
  grids = []
  transform = _qad(_QAD.value, grids) if _QAD.value else None
  if transform and _EXPORT_DTYPE.value not in (None, "float32"):
    raise ValueError("--qad_format exports float32 weights (then quantizes them exactly as "
                     "trained); drop --export_dtype")
  cfg = TrainConfig(
      mode=_MODE.value, steps=_STEPS.value, global_batch_size=_GBS.value,
      micro_batch_size=_MBS.value, seq_len=_SEQ.value, lr=_LR.value, min_lr=_MIN_LR.value,
      warmup_steps=_WARMUP.value, weight_decay=_WD.value, grad_clip=_CLIP.value,
      dtype=_DTYPE.value, remat=_REMAT.value, logits_chunk=_CHUNK.value,
      attention_impl=_ATTN.value, seed=_SEED.value,
      mesh=_MESH.value, save_every=_SAVE.value, keep_checkpoints=_KEEP.value,
      eval_every=_EVAL.value, eval_windows=_EVAL_WIN.value, log_every=_LOG.value,
      allow_schedule_change=_SCHEDULE.value,
      crash_after_save_step=_CRASH.value)
  dcfg = distill.DistillConfig(
      temperature=_TEMP.value, kl=_KL.value, top_k=_TOPK.value, hidden_loss=_HIDDEN.value,
      hidden_weight=_HIDDEN_W.value, embedding_weight=_EMB_W.value, ce_weight=_CE_W.value,
      layer_map=layer_map)
  try:
    summary = trainer.run(
        cfg, teacher_dir=_TEACHER.value, student_dir=_STUDENT.value, output_dir=_OUT.value,
        data_source=_DATA.value, eval_data=_EVAL_DATA.value, dcfg=dcfg,
        prune_report=_REPORT.value,
        export_dtype="float32" if transform else _EXPORT_DTYPE.value,
        coordinator_address=_COORD.value,
        num_processes=_NPROC.value, process_id=_PID.value, student_setup=transform,
        teacher_cache=_CACHE.value, cache_teacher_topk=_CACHE_K.value,
        cache_dtype=_CACHE_DTYPE.value)
  except trainer.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if summary.get("preempted"):
    sys.exit(143)  # like a process ended by SIGTERM: schedulers then requeue the job
  if transform and "hf_dir" in summary:  # process 0 wrote the float export
    from minitron_jax.quantize import export as quant_export
    report = quant_export.quantize_checkpoint(
        summary["hf_dir"], os.path.join(_OUT.value, "quantized"), _QAD.value, overwrite=True,
        group_size=_QAD_GROUP.value, method="rtn", progress=False,
        frozen_grid=grids[0] if grids else None)
    print(quant_export.format_report(report))


if __name__ == "__main__":
  app.run(main)
