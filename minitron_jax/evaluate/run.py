"""One evaluation: perplexity and zero-shot accuracy of a model, as a job."""

from __future__ import annotations

import dataclasses

from minitron_jax.settings import MeshSpec, SettingError, check_positive

ALL_TASKS = ("ppl", "winogrande", "piqa", "hellaswag", "arc_easy", "arc_challenge", "lambada",
             "openbookqa")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class EvalJob:
  """What to evaluate and how.

  Attributes:
    model_dir: HF directory, known short name or hub id.
    tasks: `ppl` (perplexity of `ppl_file`) and zero-shot task names (`tasks.TASKS`).
    data_root: task data folder (None: $MINITRON_JAX_DATA_ROOT, ../shared/data beside the
      project, then the Hugging Face hub).
    ppl_file: UTF-8 text for perplexity (None: the WikiText-2 test text, found as the task
      data is).
    seq_len: perplexity window length.
    max_windows: cap on perplexity windows (None: all).
    limit: first N examples per task (None: all).
    batch_size: sequences per batch.
    dtype: compute dtype.
    mesh: shards params and batch rows ("" = one device).
    output_json: where `run` writes the results (None: nowhere).
    progress: print progress.
  """

  model_dir: str
  tasks: tuple[str, ...] = ALL_TASKS
  data_root: str | None = None
  ppl_file: str | None = None
  seq_len: int = 1024
  max_windows: int | None = None
  limit: int | None = None
  batch_size: int = 16
  dtype: str = "float32"
  mesh: MeshSpec = MeshSpec()
  output_json: str | None = None
  progress: bool = True

  def validate(self) -> None:
    """Every setting on its own, before any file is read; raises SettingError."""
    from minitron_jax.evaluate import tasks

    unknown = [t for t in self.tasks if t != "ppl" and t not in tasks.TASKS]
    if unknown or not self.tasks:
      raise SettingError("tasks", f"{{name}}: unknown task(s) {unknown}; known: ppl, "
                         f"{', '.join(tasks.TASKS)}")
    check_positive(self, "seq_len", "batch_size")
    if self.seq_len < 2:
      raise SettingError("seq_len", f"{{name}}={self.seq_len} must be >= 2")
    for f in ("max_windows", "limit"):
      if getattr(self, f) is not None:
        check_positive(self, f)
    if self.dtype not in DTYPES:
      raise SettingError("dtype", f"{{name}}={self.dtype!r} is not one of {DTYPES}")
    self.mesh.validate()


def evaluate_params(job: EvalJob, params, cfg, tok, mesh=None) -> dict[str, dict]:
  """{task: metrics} of loaded `params` (sharded over `mesh` when given; `job.model_dir` and
  `job.mesh` are the caller's business here)."""
  from minitron_jax.evaluate import scoring

  return scoring.run_evaluation(params, cfg, tok, list(job.tasks), data_root=job.data_root,
                                ppl_file=job.ppl_file, seq_len=job.seq_len,
                                max_windows=job.max_windows, limit=job.limit,
                                batch_size=job.batch_size, progress=job.progress, mesh=mesh)


def run(job: EvalJob) -> dict:
  """Checks the settings and that the data is there, loads the model, evaluates it; returns
  {"model_dir": resolved directory, "results": {task: metrics}} (also `job.output_json`)."""
  from minitron_jax.evaluate import sources
  from minitron_jax.io import files
  from minitron_jax.io import hf as hf_io

  job.validate()
  sources.require_eval_data(list(job.tasks), job.data_root, ppl_file=job.ppl_file)
  params, cfg, tok, path = hf_io.load_model(job.model_dir, job.dtype)
  out = {"model_dir": path,
         "results": evaluate_params(job, params, cfg, tok, job.mesh.stage_mesh())}
  if job.output_json:
    files.write_json(job.output_json, out)
  return out
