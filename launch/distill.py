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

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from minitron_jax import cli, settings  # noqa: E402
from minitron_jax.config import ATTENTION_IMPLS  # noqa: E402
from minitron_jax.distill import losses as distill  # noqa: E402
from minitron_jax.distill import run as trainer  # noqa: E402
from minitron_jax.distill.job import CACHE_DTYPES, QAD_METHODS, DistillJob, QadSpec  # noqa: E402
from minitron_jax.distill.lora import BASE_FORMATS, LoraSpec, parse_targets  # noqa: E402
from minitron_jax.distill.step import MODES, TrainConfig  # noqa: E402

_JOB, _T, _L, _Q, _R = (DistillJob(), TrainConfig(), distill.DistillConfig(), QadSpec(),
                         LoraSpec())

_TEACHER = flags.DEFINE_string("teacher_dir", _JOB.teacher_dir,
                               "Teacher: HF directory, known short name, or hub id.")
_STUDENT = flags.DEFINE_string("student_dir", None, "Student to distil (HF directory or name).")
_OUT = flags.DEFINE_string("output_dir", None, "Checkpoints, metrics, plot and the HF export.")
_MODE = flags.DEFINE_enum("mode", _T.mode, list(MODES),
                          "distill: train the student; teacher_correction: fine-tune the "
                          "teacher alone with cross-entropy.")
_DATA = flags.DEFINE_string("data", _JOB.data, "Training corpus: file, directory, glob, hub "
                            "dataset name[:config], the bundled 'shakespeare', a prepared "
                            "directory, a Megatron .bin/.idx prefix, or a blend file.")
_EVAL_DATA = flags.DEFINE_string("eval_data", None, "Held-out corpus (default: the tail of "
                                 "--data, excluded from training).")
_STEPS = flags.DEFINE_integer("steps", _T.steps, "Optimizer updates.")
_GBS = flags.DEFINE_integer("global_batch_size", _T.global_batch_size,
                            "Rows per update (all hosts).")
_MBS = flags.DEFINE_integer("micro_batch_size", None, "Rows per forward pass (all hosts); "
                            "gradients of global/micro passes are accumulated.")
_SEQ = flags.DEFINE_integer("seq_len", _T.seq_len, "Tokens per row.")
_LR = flags.DEFINE_float("lr", _T.lr, "Peak learning rate.")
_MIN_LR = flags.DEFINE_float("min_lr", _T.min_lr, "Final learning rate of the cosine decay.")
_WARMUP = flags.DEFINE_integer("warmup_steps", _T.warmup_steps, "Linear warmup updates.")
_WD = flags.DEFINE_float("weight_decay", _T.weight_decay, "AdamW weight decay of matrices.")
_CLIP = flags.DEFINE_float("grad_clip", _T.grad_clip, "Global gradient-norm clip (0 = off).")
_MESH = flags.DEFINE_string("mesh", _T.mesh, "Device mesh, e.g. data:2,fsdp:2,tensor:2.")
_TEMP = flags.DEFINE_float("kd_temperature", _L.temperature, "Softmax temperature of the "
                           "logit KL.")
_KL = flags.DEFINE_enum("kd_loss", _L.kl, list(distill.KL_KINDS),
                        "forward = KL(teacher||student), reverse = KL(student||teacher).")
_TOPK = flags.DEFINE_integer("kd_top_k", None, "Use only the teacher's top-k logits.")
_HIDDEN = flags.DEFINE_enum("hidden_loss", _L.hidden_loss, list(distill.HIDDEN_LOSSES),
                            "Hidden-state loss between mapped layers.")
_HIDDEN_W = flags.DEFINE_float("hidden_weight", None, "Weight of the hidden loss (default: "
                               "dynamic, L_logits / L_hidden).")
_EMB_W = flags.DEFINE_float("embedding_weight", _L.embedding_weight,
                            "Weight of the embedding-output loss.")
_CE_W = flags.DEFINE_float("ce_weight", _L.ce_weight, "Weight of cross-entropy on the data "
                           "labels.")
_LAYER_MAP = flags.DEFINE_string("layer_map", None, "Teacher layer of each student layer, e.g. "
                                 "0-7,12,16-31 (default: from --prune_report, else identity).")
_REPORT = flags.DEFINE_string("prune_report", None, "The student's pruning report (JSON; "
                              "default: prune_report.json in --student_dir): its kept layers "
                              "are the layer map, its kept embedding channels start the "
                              "hidden-state projection.")
_SAVE = flags.DEFINE_integer("save_every", _T.save_every, "Checkpoint every N updates (0 = at "
                             "the end only).")
_KEEP = flags.DEFINE_integer("keep_checkpoints", _T.keep_checkpoints, "Checkpoints to keep.")
# The command line evaluates and logs more often than a library run does by default.
_EVAL = flags.DEFINE_integer("eval_every", 50, "Held-out evaluation every N updates (0 = "
                             "never).")
_EVAL_WIN = flags.DEFINE_integer("eval_windows", _T.eval_windows, "Held-out windows of seq_len "
                                 "tokens.")
_LOG = flags.DEFINE_integer("log_every", 10, "Console line every N updates.")
_DTYPE = flags.DEFINE_enum("dtype", _T.dtype, ["float32", "bfloat16"],
                           "Compute dtype (parameters stay float32).")
_EXPORT_DTYPE = flags.DEFINE_enum("export_dtype", None, ["float32", "bfloat16", "float16"],
                                  "Dtype of the exported weights (default: the input's).")
_REMAT = flags.DEFINE_bool("remat", _T.remat, "Recompute layer activations in the backward "
                           "pass.")
_CHUNK = flags.DEFINE_integer("logits_chunk", _T.logits_chunk, "Tokens per row whose logits "
                              "exist at once in the losses (0 = the whole sequence).")
_ATTN = flags.DEFINE_enum("attention_impl", _T.attention_impl, list(ATTENTION_IMPLS),
                          "Attention kernel: auto = splash on TPU, Pallas/cuDNN flash on GPU, "
                          "XLA on CPU.")
_SEED = flags.DEFINE_integer("seed", _T.seed, "Data order and projection init.")
_WORKERS = flags.DEFINE_integer("data_workers", _T.data_workers, "Data-loader worker "
                                "processes per JAX process (0 = none); the batches are the "
                                "same at any count.")
_COORD = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.",
                              lower_bound=1)
_PID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.",
                            lower_bound=0)
_SCHEDULE = flags.DEFINE_bool("allow_schedule_change", _T.allow_schedule_change, "On resume, "
                              "accept new --steps, --lr, --min_lr or --warmup_steps instead of "
                              "refusing them.")
_KEEP_SPARSITY = flags.DEFINE_bool("keep_sparsity", _T.keep_sparsity, "Masked distillation "
                                   "of a sparse student (launch/sparsify.py): the linear "
                                   "weights that start at zero stay zero.")
_CACHE = flags.DEFINE_string("teacher_cache", None, "Directory of offline teacher logits: "
                             "written with --cache_teacher_topk, else read instead of running "
                             "the teacher.")
_CACHE_K = flags.DEFINE_integer("cache_teacher_topk", _JOB.cache_topk, "Write the teacher's "
                                "top-K logits of this run's batches to --teacher_cache and stop "
                                "(0 = read).")
_CACHE_DTYPE = flags.DEFINE_enum("cache_dtype", _JOB.cache_dtype, list(CACHE_DTYPES),
                                 "dtype of the cached logits.")
_QAD = flags.DEFINE_string("qad_format", None, "Quantization-aware distillation: the student's "
                           "linear weights pass through fake quantization in this export format "
                           "(fp8, fp8_channel, fp8_tensor, int8, int4, int4_asym) inside the "
                           "loss, and the result is also exported in it (<output_dir>/quantized)."
                           " Works with --teacher_cache.")
_QAD_GROUP = flags.DEFINE_integer("qad_group_size", _Q.group_size, "INT4 group size of "
                                  "--qad_format.")
_QAD_METHOD = flags.DEFINE_enum("qad_method", _Q.method, list(QAD_METHODS),
                                "Grid of --qad_format: rtn = round to nearest, re-derived from "
                                "the moving weights at every step; a calibrated method = the "
                                "grid of that method's quantization of the student, frozen, "
                                "training starting from its quantized weights.")
_QAD_CALIB = flags.DEFINE_string("qad_calib_data", None, "Calibration text of --qad_method "
                                 "(default --data).")
_QAD_NCAL = flags.DEFINE_integer("qad_calib_samples", _Q.calib.samples, "Calibration windows "
                                 "of --qad_method.")
_QAD_LCAL = flags.DEFINE_integer("qad_calib_seq_len", _Q.calib.seq_len, "Tokens per "
                                 "calibration window.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 0, "LoRA: train rank-R adapters on the frozen "
                                  "model instead of every weight (distill or "
                                  "teacher_correction); the export merges them (0 = off).")
_LORA_TARGETS = flags.DEFINE_string("lora_targets", ",".join(_R.targets), "LoRA: the linear "
                                    "layers that get adapters, of q,k,v,o,gate,up,down.")
_LORA_ALPHA = flags.DEFINE_float("lora_alpha", None, "LoRA: adapters scaled by alpha / rank "
                                 "(default alpha = rank).")
_LORA_BASE = flags.DEFINE_enum("lora_base_format", None, list(BASE_FORMATS), "QLoRA: hold the "
                               "frozen base's linear weights in this INT format (default: the "
                               "compute dtype).")
_LORA_GROUP = flags.DEFINE_integer("lora_group_size", _R.group_size, "INT4 group size of "
                                   "--lora_base_format.")
_LORA_PEFT = flags.DEFINE_bool("lora_peft", _R.peft, "LoRA: also write the adapters as a PEFT "
                               "adapter directory (<output_dir>/peft) for the student.")

# Job fields whose flag is not `--` + the field's last part.
FLAG_NAMES = settings.flag_names({
    "temperature": "--kd_temperature", "kl": "--kd_loss", "top_k": "--kd_top_k",
    "cache_topk": "--cache_teacher_topk", "qad.format": "--qad_format",
    "qad.group_size": "--qad_group_size", "qad.method": "--qad_method",
    "qad.calib.data": "--qad_calib_data", "qad.calib.samples": "--qad_calib_samples",
    "qad.calib.seq_len": "--qad_calib_seq_len", "lora.rank": "--lora_rank",
    "lora.targets": "--lora_targets", "lora.alpha": "--lora_alpha",
    "lora.base_format": "--lora_base_format", "lora.group_size": "--lora_group_size",
    "lora.peft": "--lora_peft"})


def _lora_spec() -> LoraSpec | None:
  """The LoRA spec of the --lora_* flags; None when none is given."""
  given = (_LORA_RANK.value, _LORA_ALPHA.value is not None, _LORA_BASE.value, _LORA_PEFT.value,
           _LORA_GROUP.value != _R.group_size,
           parse_targets(_LORA_TARGETS.value) != _R.targets)
  if not any(given):
    return None
  return LoraSpec(rank=_LORA_RANK.value, targets=parse_targets(_LORA_TARGETS.value),
                  alpha=_LORA_ALPHA.value, base_format=_LORA_BASE.value or "",
                  group_size=_LORA_GROUP.value, peft=_LORA_PEFT.value)


def _qad_spec() -> QadSpec | None:
  """The QAD spec of the --qad_* flags; None when none is given."""
  given = (_QAD.value, _QAD_METHOD.value != _Q.method, _QAD_CALIB.value,
           _QAD_GROUP.value != _Q.group_size)
  if not any(given):
    return None
  calib = dataclasses.replace(_Q.calib, data=_QAD_CALIB.value or "", samples=_QAD_NCAL.value,
                              seq_len=_QAD_LCAL.value)
  return QadSpec(format=_QAD.value or "", group_size=_QAD_GROUP.value,
                 method=_QAD_METHOD.value, calib=calib)


def build_job() -> DistillJob:
  """The job of the command line (raises SettingError naming job fields)."""
  train = TrainConfig(
      mode=_MODE.value, steps=_STEPS.value, global_batch_size=_GBS.value,
      micro_batch_size=_MBS.value, seq_len=_SEQ.value, lr=_LR.value, min_lr=_MIN_LR.value,
      warmup_steps=_WARMUP.value, weight_decay=_WD.value, grad_clip=_CLIP.value,
      dtype=_DTYPE.value, remat=_REMAT.value, logits_chunk=_CHUNK.value,
      attention_impl=_ATTN.value, seed=_SEED.value, mesh=_MESH.value, save_every=_SAVE.value,
      keep_checkpoints=_KEEP.value, eval_every=_EVAL.value, eval_windows=_EVAL_WIN.value,
      log_every=_LOG.value, allow_schedule_change=_SCHEDULE.value,
      keep_sparsity=_KEEP_SPARSITY.value, data_workers=_WORKERS.value)
  loss = distill.DistillConfig(
      temperature=_TEMP.value, kl=_KL.value, top_k=_TOPK.value, hidden_loss=_HIDDEN.value,
      hidden_weight=_HIDDEN_W.value, embedding_weight=_EMB_W.value, ce_weight=_CE_W.value,
      layer_map=distill.parse_layer_map(_LAYER_MAP.value) if _LAYER_MAP.value else None)
  return DistillJob(
      output_dir=_OUT.value or "", teacher_dir=_TEACHER.value, student_dir=_STUDENT.value,
      data=_DATA.value, eval_data=_EVAL_DATA.value, train=train, loss=loss,
      prune_report=_REPORT.value, export_dtype=_EXPORT_DTYPE.value,
      teacher_cache=_CACHE.value, cache_topk=_CACHE_K.value, cache_dtype=_CACHE_DTYPE.value,
      qad=_qad_spec(), lora=_lora_spec(), coordinator_address=_COORD.value, num_processes=_NPROC.value,
      process_id=_PID.value)


@cli.main_wrapper
def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  with settings.named(FLAG_NAMES):
    job = build_job()
    job.validate()
    setup = None
    if job.qad is not None:
      from minitron_jax.quantize import qad
      setup = qad.QadSetup(job.qad, job.data)
    if job.lora is not None and job.lora.base_format:
      from minitron_jax.quantize import formats
      setup = formats.QuantizedBase(job.lora.base_format, job.lora.group_size)
    try:
      summary = trainer.run(job, student_setup=setup)
    except trainer.NonFiniteLossError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  if summary.get("preempted"):
    sys.exit(143)  # like a process ended by SIGTERM: schedulers then requeue the job
  if job.qad is not None and "hf_dir" in summary:  # process 0 wrote the float export
    from minitron_jax.quantize import export as quant_export
    print(quant_export.format_report(setup.export(summary["hf_dir"], job.output_dir)))


if __name__ == "__main__":
  app.run(main)
