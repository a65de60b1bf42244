"""Every stage's job, built from the recipe config in one place and validated before the first
stage runs.

The recipe config (`configs/base.py`) holds the recipe's settings; the job dataclasses hold the
library's defaults for everything the config does not set. A bad setting raises
`settings.SettingError` naming its config key (`prune.calib_samples`), not the job's field.

Distillation jobs (teacher correction, the teacher-logits cache, the students, the baselines)
are built by `distill_job`.
"""

from __future__ import annotations

import os
from typing import Iterable

from minitron_jax import settings
from minitron_jax.data.calib import CalibSpec
from minitron_jax.recipe import layout
from minitron_jax.settings import MeshSpec, SettingError

KINDS = ("width", "depth")
# Perplexity windows of each quantized export's report (its before / after on WikiText-2 test;
# the evaluate stage measures every model on `eval.max_windows`).
QUANTIZE_PPL_WINDOWS = 2

# Job field -> config key, for the fields whose key is not `<section>.<field>`.
_COMMON = {"calib.data": "data.source", "calib.samples": "prune.calib_samples",
           "calib.seq_len": "prune.calib_seq_len", "calib.batch_size": "prune.batch_size",
           "calib.seed": "seed", "dtype": "dtype", "mesh": "mesh", "data_root": "data_root",
           "model_dir": "teacher"}
_SEARCH = {"budget.target_params": "prune.search.target_params",
           "budget.target_memory_gb": "prune.search.target_memory_gb",
           "budget.kv_tokens": "prune.search.kv_tokens",
           "budget.dtype": "prune.search.export_dtype", "budget.slack": "prune.search.budget_slack",
           "budget.max_width_cut": "prune.search.max_width_cut",
           "budget.max_depth_cut": "prune.search.max_depth_cut",
           "budget.multiple": "prune.search.width_multiple",
           "max_candidates": "prune.search.max_candidates", "top_k": "prune.search.top_k",
           "search_steps": "prune.search.steps", "teacher_topk": "prune.search.teacher_topk",
           "score_task": "prune.search.task", "task_limit": "prune.search.task_limit",
           "search_batch_size": "distill.global_batch_size", "search_lr": "distill.lr"}


def prune_names(kind: str):
  """Field of `PruneJob` -> config key, for the `kind` student."""
  from minitron_jax.prune.run import TARGETS

  targets = {t: f"prune.{kind}.{t}" for t in TARGETS + ("drop_layers",)}
  return settings.config_names({**_COMMON, **targets}, section="prune")


def search_names():
  return settings.config_names({**_COMMON, **_SEARCH}, section="prune")


def quantize_names():
  return settings.config_names({"format": "quantize.formats", "model_dir": "quantize.source",
                                "mesh": "mesh", "ppl_file": "eval.ppl_file"},
                               section="quantize")


def sparsify_names():
  return settings.config_names({"model_dir": "sparsify.source", "mesh": "mesh",
                                "ppl_file": "eval.ppl_file",
                                "calib.data": "data.source",
                                "calib.samples": "sparsify.calib_samples",
                                "calib.seq_len": "sparsify.calib_seq_len",
                                "calib.batch_size": "prune.batch_size", "calib.seed": "seed"},
                               section="sparsify")


def eval_names():
  return settings.config_names({"dtype": "dtype", "mesh": "mesh", "data_root": "data_root"},
                               section="eval")


def source_dir(cfg, run_dir: str, name: str) -> str:
  """HF directory of a model stage; before the fetch stage has run, the teacher as the
  config names it."""
  if name == "teacher" and not os.path.isfile(os.path.join(run_dir, "teacher.json")):
    return cfg.teacher
  return layout.model_dir(run_dir, name)


def students_source(cfg, run_dir: str) -> str:
  """The model the students are pruned and distilled from."""
  return source_dir(cfg, run_dir, layout.students_teacher(cfg))


def _calib(cfg, run_dir: str) -> CalibSpec:
  p = cfg.prune
  return CalibSpec(data=layout.training_data(run_dir), samples=p.calib_samples,
                   seq_len=p.calib_seq_len, batch_size=p.batch_size, seed=cfg.seed)


def prune_job(cfg, run_dir: str, kind: str):
  """The job of stage `prune_<kind>` (`prune.<kind>` holds its targets)."""
  from minitron_jax.prune import run as prune_run

  p = cfg.prune
  return prune_run.PruneJob(
      model_dir=students_source(cfg, run_dir),
      output_dir=os.path.join(run_dir, f"pruned_{kind}"), importance=p.importance,
      aggregation=p.aggregation, layer_importance=p.layer_importance, calib=_calib(cfg, run_dir),
      eval_samples=p.eval_samples, layer_batches=p.layer_batches, data_root=layout.data_root(cfg),
      overwrite=True, dtype=cfg.dtype, mesh=MeshSpec(cfg.mesh), **dict(p[kind] or {}))


def search_job(cfg, run_dir: str):
  """The job of stage `prune_search` (`prune.search` holds the budget and its settings)."""
  from minitron_jax.prune import search as search_space
  from minitron_jax.recipe import search

  p, s = cfg.prune, cfg.prune.search
  budget = search_space.Budget(target_params=s.target_params or None,
                               target_memory_gb=s.target_memory_gb or None,
                               kv_tokens=s.kv_tokens, dtype=s.export_dtype,
                               slack=s.budget_slack, max_width_cut=s.max_width_cut,
                               max_depth_cut=s.max_depth_cut, multiple=s.width_multiple)
  return search.SearchJob(
      model_dir=students_source(cfg, run_dir), output_dir=os.path.join(run_dir, "pruned_search"),
      budget=budget, max_candidates=s.max_candidates, top_k=s.top_k, search_steps=s.steps,
      search_batch_size=cfg.distill.global_batch_size, search_lr=cfg.distill.lr,
      teacher_topk=s.teacher_topk, score_task=s.task, task_limit=s.task_limit,
      data_root=layout.data_root(cfg), importance=p.importance, aggregation=p.aggregation,
      calib=_calib(cfg, run_dir), eval_samples=p.eval_samples, overwrite=True, dtype=cfg.dtype)


def quantize_jobs(cfg, run_dir: str, ppl_file: str | None = None) -> list:
  """One job per format of `quantize.formats`, each measuring perplexity on `ppl_file`."""
  from minitron_jax.quantize import run as quantize_run

  src = source_dir(cfg, run_dir, cfg.quantize.source)
  return [quantize_run.QuantizeJob(
      model_dir=src, output_dir=os.path.join(run_dir, "quantized", fmt), format=fmt,
      overwrite=True, ppl_file=ppl_file, max_windows=QUANTIZE_PPL_WINDOWS,
      gguf_tokenizer_pre=cfg.quantize.gguf_tokenizer_pre,
      mesh=MeshSpec(cfg.mesh)) for fmt in cfg.quantize.formats]


def sparsify_job(cfg, run_dir: str, ppl_file: str | None = None):
  """The sparse student (`sparsify.*`), written dense into `sparse/` (the evaluate stage
  reads it); the calibrated methods read the training data."""
  from minitron_jax.sparsify import run as sparsify_run

  s = cfg.sparsify
  calib = CalibSpec(data=layout.training_data(run_dir) if s.method != "magnitude" else "",
                    samples=s.calib_samples, seq_len=s.calib_seq_len,
                    batch_size=cfg.prune.batch_size, seed=cfg.seed)
  return sparsify_run.SparsifyJob(
      model_dir=source_dir(cfg, run_dir, s.source), output_dir=os.path.join(run_dir, "sparse"),
      method=s.method, pattern=s.pattern, sparsity=s.sparsity, export="dense", overwrite=True,
      calib=calib, ppl_file=ppl_file, max_windows=QUANTIZE_PPL_WINDOWS, mesh=MeshSpec(cfg.mesh))


def eval_job(cfg, model_dir: str, tasks: Iterable[str], reference: bool = False):
  """How the evaluate stage measures one model on `tasks` (a subset of `eval.tasks`); a
  `reference` model gets neither the protocol's tasks nor `eval.qa_task`."""
  from minitron_jax.evaluate import run as eval_run

  e = cfg.eval
  return eval_run.EvalJob(model_dir=model_dir, tasks=tuple(tasks),
                          data_root=layout.data_root(cfg), ppl_file=e.ppl_file or None,
                          seq_len=e.seq_len, max_windows=e.max_windows or None,
                          limit=e.limit or None, batch_size=e.batch_size, dtype=cfg.dtype,
                          mesh=MeshSpec(cfg.mesh), progress=False,
                          protocol=e.get("protocol", "zero_shot"), protocol_tasks=not reference,
                          qa_task="" if reference else e.get("qa_task", ""))


# DistillJob fields whose config key is not `<section>.<field>`.
_DISTILL = {"dtype": "train_dtype", "mesh": "mesh", "seed": "seed",
            "data_workers": "data.workers", "temperature": "distill.kd_temperature",
            "cache_topk": "distill.teacher_topk",
            "teacher_cache": "distill.teacher_topk", "qad.format": "distill.qad_format",
            "qad.method": "distill.qad_method", "lora.rank": "distill.lora_rank",
            "lora.targets": "distill.lora_targets", "lora.alpha": "distill.lora_alpha",
            "lora.base_format": "distill.lora_base_format"}
# The model each distillation-stage run trains, its objective and config section.
DISTILL_RUNS = {
    "corrected": ("correction", "teacher_correction"),
    "teacher_logits": ("distill", "distill"),
    "distill_width": ("distill", "distill"),
    "distill_depth": ("distill", "distill"),
    "distill_search": ("distill", "distill"),
    "baseline_pruned_ce": ("distill", "teacher_correction"),
    "baseline_random_ce": ("distill", "teacher_correction"),
}


def distill_names(section: str):
  """Field of `DistillJob` (and its train and loss settings) -> config key."""
  return settings.config_names(_DISTILL, section=section)


def train_config(cfg, section: str, mode: str):
  from minitron_jax.distill.step import TrainConfig

  t = cfg[section]
  return TrainConfig(
      mode=mode, steps=t.steps, global_batch_size=t.global_batch_size,
      micro_batch_size=t.micro_batch_size or None, seq_len=t.seq_len, lr=t.lr, min_lr=t.min_lr,
      warmup_steps=t.warmup_steps, dtype=cfg.train_dtype, remat=bool(t.remat), mesh=cfg.mesh,
      save_every=t.save_every, eval_every=t.eval_every, eval_windows=t.eval_windows,
      seed=cfg.seed, log_every=max(1, t.steps // 20),
      data_workers=layout.get(cfg, "data.workers", 0))


def caching_teacher(cfg) -> bool:
  """Whether the students distil from one cached pass of the teacher (`distill.teacher_topk`)."""
  return bool(cfg.distill.teacher_topk)


def teacher_cache_dir(run_dir: str) -> str:
  return os.path.join(run_dir, "teacher_logits", "cache")


def qad_spec(cfg):
  """The students' quantization-aware distillation (`distill.qad_format`), or None."""
  from minitron_jax.distill.job import QadSpec

  d = cfg.distill
  if not d.qad_format:
    return None
  return QadSpec(format=d.qad_format, **({"method": d.qad_method} if d.qad_method else {}))


def lora_spec(cfg):
  """The students' LoRA recovery (`distill.lora_rank` > 0), or None (every weight trains)."""
  from minitron_jax.distill.lora import LoraSpec, parse_targets

  d = cfg.distill
  if not d.lora_rank:
    return None
  return LoraSpec(rank=d.lora_rank, targets=parse_targets(d.lora_targets),
                  alpha=d.lora_alpha or None, base_format=d.lora_base_format)


def _student_loss(cfg, run_dir: str, kind: str):
  from minitron_jax.distill import losses

  d = cfg.distill
  report = os.path.join(run_dir, f"pruned_{kind}", "prune_report.json")
  layer_map = losses.layer_map_from_report(report) if os.path.isfile(report) else None
  return losses.DistillConfig(temperature=d.kd_temperature, hidden_loss=d.hidden_loss,
                              layer_map=layer_map)


def distill_job(cfg, run_dir: str, name: str):
  """The job of distillation-stage run `name` (a key of `DISTILL_RUNS`)."""
  from minitron_jax.distill.job import DistillJob

  section, mode = DISTILL_RUNS[name]
  common = dict(output_dir=os.path.join(run_dir, name), data=layout.training_data(run_dir),
                train=train_config(cfg, section, mode), export_dtype="float32")
  if name == "corrected":
    return DistillJob(teacher_dir=source_dir(cfg, run_dir, "teacher"), **common)
  if name == "teacher_logits":
    common.pop("export_dtype")
    return DistillJob(teacher_dir=students_source(cfg, run_dir),
                      teacher_cache=teacher_cache_dir(run_dir),
                      cache_topk=int(cfg.distill.teacher_topk), **common)
  if name.startswith("distill_"):
    kind = name.removeprefix("distill_")
    return DistillJob(teacher_dir=students_source(cfg, run_dir),
                      student_dir=os.path.join(run_dir, f"pruned_{kind}"),
                      loss=_student_loss(cfg, run_dir, kind),
                      teacher_cache=teacher_cache_dir(run_dir) if caching_teacher(cfg) else None,
                      qad=qad_spec(cfg), lora=lora_spec(cfg), **common)
  init = (os.path.join(run_dir, "pruned_width") if name == "baseline_pruned_ce" else
          os.path.join(run_dir, name, "init"))
  return DistillJob(teacher_dir=init, **common)


def check_recipe(cfg) -> None:
  """The settings that choose stages: which students, what to quantize; the data weights."""
  layout.data_weights(cfg)
  bad = sorted(set(cfg.prune.kinds) - set(KINDS))
  if bad:
    raise SettingError("prune.kinds", f"{{name}}: {bad} not in {KINDS}")
  src = cfg.quantize.source
  if cfg.quantize.formats and src not in layout.MODEL_STAGES:
    raise SettingError("quantize.source", f"{{name}}={src!r} is not one of "
                       f"{layout.MODEL_STAGES}")
  if cfg.quantize.formats and any(src.endswith(k) and k not in cfg.prune.kinds for k in KINDS):
    raise SettingError("quantize.source", f"{{name}}={src!r} is not made: prune.kinds="
                       f"{tuple(cfg.prune.kinds)}")
  src = layout.get(cfg, "sparsify.source")
  if layout.get(cfg, "sparsify.pattern") and (
      src not in layout.MODEL_STAGES
      or any(src.endswith(k) and k not in cfg.prune.kinds for k in KINDS)):
    raise SettingError("sparsify.source", f"{{name}}={src!r} is not a model this run makes "
                       f"(one of {layout.MODEL_STAGES}, prune.kinds={tuple(cfg.prune.kinds)})")


def validate(cfg, run_dir: str, stage_names: Iterable[str]) -> None:
  """Builds the job of every stage in `stage_names` and validates it, before any runs;
  raises SettingError naming the config key."""
  todo = set(stage_names)
  check_recipe(cfg)
  for kind in KINDS:
    if f"prune_{kind}" in todo:
      with settings.named(prune_names(kind)):
        prune_job(cfg, run_dir, kind).validate()
  if "prune_search" in todo:
    with settings.named(search_names()):
      search_job(cfg, run_dir).validate()
  if "quantize" in todo:
    with settings.named(quantize_names()):
      for job in quantize_jobs(cfg, run_dir):
        job.validate()
  if "sparsify" in todo:
    with settings.named(sparsify_names()):
      sparsify_job(cfg, run_dir).validate()
  for name, (section, _) in DISTILL_RUNS.items():
    if name in todo:
      with settings.named(distill_names(section)):
        distill_job(cfg, run_dir, name).validate()
  if "evaluate" in todo:
    with settings.named(eval_names()):
      eval_job(cfg, cfg.teacher, cfg.eval.tasks).validate()
