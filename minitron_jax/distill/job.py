"""The distillation stage as one typed job: what to train, on what, and how, with its defaults.

`DistillJob` holds every setting of a run (distillation, teacher correction, writing a teacher
cache, or distilling from one) and checks them in `validate()` before any model is loaded; a
wrong value raises `settings.SettingError` naming the field, which launch scripts and the
recipe rename into their own vocabulary (`--lr`, `distill.lr`). `run.run(job)` executes it.

Field names in errors: the job's own fields (`student_dir`, `teacher_cache`), the fields of
`TrainConfig` and `DistillConfig` by their bare names (`micro_batch_size`, `temperature`), and
the QAD spec's as `qad.<field>` (`qad.calib.samples`).
"""

from __future__ import annotations

import dataclasses

from minitron_jax.data.calib import CalibSpec
from minitron_jax.distill.losses import DistillConfig, check_topk_targets
from minitron_jax.distill.lora import LoraSpec
from minitron_jax.distill.step import TrainConfig
from minitron_jax.settings import MeshSpec, SettingError, check_positive

QAD_METHODS = ("rtn", "gptq", "awq", "awq_gptq")
CACHE_DTYPES = ("float32", "bfloat16")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class QadSpec:
  """Quantization-aware distillation: the student's linear weights pass through fake
  quantization in an export format inside the loss, and the result is exported in it.

  Attributes:
    format: an export format the step can fake-quantize (`quantize.qad.check_format`).
    group_size: INT4 group size.
    method: "rtn" re-derives the grid from the moving weights at every step; a calibrated
      method (gptq, awq, awq_gptq) freezes the grid of that method's quantization of the
      student, and training starts from its quantized weights.
    calib: calibration windows of a calibrated method; `data=""` = the job's training data.
  """

  format: str = ""
  group_size: int = 128
  method: str = "rtn"
  calib: CalibSpec = CalibSpec(data="", samples=32, seq_len=512)

  def validate(self, prefix: str = "qad.") -> None:
    if not self.format:
      raise SettingError(prefix + "format", "{name} is required for quantization-aware "
                         "distillation (name an export format)")
    if self.method not in QAD_METHODS:
      raise SettingError(prefix + "method", f"{{name}} must be one of {QAD_METHODS}, got "
                         f"{self.method!r}")
    if self.calib.data and self.method == "rtn":
      raise SettingError(prefix + "calib.data", "{name} is for a calibrated method (gptq, "
                         "awq, awq_gptq), not rtn")
    if not isinstance(self.group_size, int) or self.group_size < 2:
      raise SettingError(prefix + "group_size", f"{{name}} must be an integer >= 2, got "
                         f"{self.group_size!r}")
    check_positive(self.calib, "samples", "seq_len", "batch_size", prefix=prefix + "calib.")

  def calib_for(self, data: str) -> CalibSpec:
    """The calibration spec with the training data where none is named."""
    return dataclasses.replace(self.calib, data=self.calib.data or data)


@dataclasses.dataclass(frozen=True)
class DistillJob:
  """One distillation-stage run (see `run.run`).

  Attributes:
    output_dir: checkpoints, metrics, plot, `run.json` and the HF export under `hf/`.
    teacher_dir: HF directory, known short name or hub id of the teacher.
    student_dir: the student (distill mode); teacher correction trains the teacher alone.
    data: training corpus (`data.corpus.load_tokens`).
    eval_data: held-out corpus; None = the tail of `data`, excluded from training.
    train: optimisation and run settings (`train.mode` picks the objective).
    loss: what the student is trained to match (distill mode).
    prune_report: the student's pruning report; None = `prune_report.json` in `student_dir`
      if present (its kept layers are the layer map, its kept embedding channels the start of
      the hidden-state projection).
    export_dtype: dtype of the exported tensors; None = that of the trained checkpoint.
    teacher_cache: a teacher-cache directory: written when `cache_topk` > 0 (then the run
      stops), else read instead of running the teacher.
    cache_topk: K of the cache to write (0 = read `teacher_cache`, if set).
    cache_dtype: dtype of the cached logits.
    qad: quantization-aware distillation, or None.
    lora: train LoRA adapters on the frozen model (distillation or teacher correction) and
      export them merged, or None (every weight trains).
    coordinator_address, num_processes, process_id: multi-host settings (None = the
      cluster's environment, or one process).
  """

  output_dir: str = ""
  teacher_dir: str = "smollm2-135m"
  student_dir: str | None = None
  data: str = "shakespeare"
  eval_data: str | None = None
  train: TrainConfig = TrainConfig()
  loss: DistillConfig = DistillConfig()
  prune_report: str | None = None
  export_dtype: str | None = None
  teacher_cache: str | None = None
  cache_topk: int = 0
  cache_dtype: str = "float32"
  qad: QadSpec | None = None
  lora: LoraSpec | None = None
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def distilling(self) -> bool:
    return self.train.mode == "distill"

  @property
  def writing_cache(self) -> bool:
    return self.cache_topk > 0

  def validate(self) -> None:
    """Raises SettingError naming the first wrong field; loads nothing."""
    if not self.output_dir:
      raise SettingError("output_dir", "{name} is required")
    if not self.teacher_dir:
      raise SettingError("teacher_dir", "{name} is required")
    MeshSpec(self.train.mesh).validate("mesh")
    self._validate_cache()
    if self.distilling and not self.student_dir and not self.writing_cache:
      raise SettingError("student_dir", "{name} is required to distil (teacher correction "
                         "trains the teacher alone)")
    if self.export_dtype not in (None,) + EXPORT_DTYPES:
      raise SettingError("export_dtype", f"{{name}} must be one of {EXPORT_DTYPES}, got "
                         f"{self.export_dtype!r}")
    if self.qad is not None:
      self.qad.validate()
      if not self.distilling:
        raise SettingError("qad.format", "{name} is for distillation, not teacher correction")
      if self.export_dtype not in (None, "float32"):
        raise SettingError("export_dtype", "{name}: quantization-aware distillation exports "
                           "float32 weights (then quantizes them exactly as trained); leave "
                           "it unset")

    if self.lora is not None:
      self.lora.validate()
      if self.qad is not None:
        raise SettingError("lora.rank", "{name}: LoRA adapters and quantization-aware "
                           "distillation do not combine (QLoRA: lora.base_format)")
      if self.writing_cache:
        raise SettingError("lora.rank", "{name} is for training, not for writing a teacher "
                           "cache")

  def _validate_cache(self) -> None:
    if not isinstance(self.cache_topk, int) or self.cache_topk < 0:
      raise SettingError("cache_topk", f"{{name}} must be an integer >= 0, got "
                         f"{self.cache_topk!r}")
    if self.cache_dtype not in CACHE_DTYPES:
      raise SettingError("cache_dtype", f"{{name}} must be one of {CACHE_DTYPES}, got "
                         f"{self.cache_dtype!r}")
    if self.writing_cache and not self.teacher_cache:
      raise SettingError("teacher_cache", "{name} is required to write a teacher cache (the "
                         "directory to write)")
    if self.teacher_cache and not self.distilling:
      raise SettingError("teacher_cache", "{name} is for distillation, not teacher correction")
    if self.teacher_cache and not self.writing_cache:
      check_topk_targets(self.loss)
