"""One evaluation: perplexity, zero- or few-shot accuracy and closed-book QA of a model, as a
job."""

from __future__ import annotations

import dataclasses

from minitron_jax.settings import MeshSpec, SettingError, check_positive

ALL_TASKS = ("ppl", "winogrande", "piqa", "hellaswag", "arc_easy", "arc_challenge", "lambada",
             "openbookqa")
DTYPES = ("float32", "bfloat16")
# Shots per task of each report protocol; a task not named is zero-shot. "minitron": the
# columns of the Llama-3.1-Minitron table (MMLU 5-shot, WinoGrande 5, ARC-Challenge 25,
# HellaSwag 10); a protocol's tasks join the job's (`EvalJob.run_tasks`).
PROTOCOLS: dict[str, dict[str, int]] = {
  "zero_shot": {},
  "minitron": {"mmlu": 5, "winogrande": 5, "arc_challenge": 25, "hellaswag": 10},
}


def parse_fewshot(spec: str) -> dict[str, int]:
  """`num_fewshot` as {task: shots}: "" (none), "5" (every task, key "*") or
  "mmlu:5,hellaswag:10"; raises SettingError."""
  out = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    task, _, k = part.rpartition(":")
    if not k.isdigit():
      raise SettingError("num_fewshot", f"{{name}}={spec!r}: {part!r} is not N or TASK:N")
    out[task or "*"] = int(k)
  return out


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
    protocol: shots per task by default (`PROTOCOLS`).
    num_fewshot: shots overriding the protocol: "5" for every task or "mmlu:5,winogrande:0".
    mmlu_only_ok: score only the MMLU-Redux questions whose label was confirmed.
    mmlu_per_subject: score only the first N questions of each MMLU subject (None: all).
    harness_tasks: lm-evaluation-harness tasks to run through its `minitron_jax` backend
      (needs the `eval` extra); their shots follow `num_fewshot` ("*") or the task's default.
    harness_include_path: folder of extra harness task YAMLs.
    qa_task: closed-book QA task scored by exact match of greedy answers (`qa.QA_TASKS`),
      "triviaqa" or "triviaqa:200" (its first 200 questions; else `limit`); "" = none. Its
      context is the model's whole context length, as the harness backend's default.
    protocol_tasks: whether the protocol's tasks join `tasks` (False: `tasks` alone, as for
      the recipe's reference models).
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
  protocol: str = "zero_shot"
  num_fewshot: str = ""
  mmlu_only_ok: bool = False
  mmlu_per_subject: int | None = None
  harness_tasks: tuple[str, ...] = ()
  harness_include_path: str | None = None
  qa_task: str = ""
  protocol_tasks: bool = True

  def run_tasks(self) -> tuple[str, ...]:
    """`tasks`, then the protocol's tasks that are not among them (when `protocol_tasks`)."""
    extra = PROTOCOLS.get(self.protocol, {}) if self.protocol_tasks else {}
    return tuple(self.tasks) + tuple(t for t in extra if t not in self.tasks)

  def qa(self) -> tuple[str, int | None] | None:
    """(QA task, item cap) or None; the cap defaults to `limit`."""
    from minitron_jax.evaluate import qa

    if not self.qa_task:
      return None
    name, cap = qa.parse_qa_task(self.qa_task)
    return name, cap or self.limit

  def shots(self) -> dict[str, int]:
    """{task: shots} of every in-house task of the job, the QA task included."""
    given = parse_fewshot(self.num_fewshot)
    base = PROTOCOLS[self.protocol]
    qa_task = self.qa()
    names = [t for t in self.run_tasks() if t != "ppl"] + ([qa_task[0]] if qa_task else [])
    return {t: given.get(t, given.get("*", base.get(t, 0))) for t in names}

  def validate(self) -> None:
    """Every setting on its own, before any file is read; raises SettingError."""
    from minitron_jax.evaluate import tasks

    unknown = [t for t in self.tasks if t != "ppl" and t not in tasks.TASKS]
    if unknown or not (self.tasks or self.harness_tasks):
      raise SettingError("tasks", f"{{name}}: unknown task(s) {unknown}; known: ppl, "
                         f"{', '.join(tasks.TASKS)}")
    check_positive(self, "seq_len", "batch_size")
    if self.seq_len < 2:
      raise SettingError("seq_len", f"{{name}}={self.seq_len} must be >= 2")
    if self.protocol not in PROTOCOLS:
      raise SettingError("protocol", f"{{name}}={self.protocol!r} is not one of "
                         f"{tuple(PROTOCOLS)}")
    try:
      self.qa()
    except ValueError as err:
      raise SettingError("qa_task", f"{{name}}: {err}") from None
    self.shots()  # parses num_fewshot
    for f in ("max_windows", "limit", "mmlu_per_subject"):
      if getattr(self, f) is not None:
        check_positive(self, f)
    if self.dtype not in DTYPES:
      raise SettingError("dtype", f"{{name}}={self.dtype!r} is not one of {DTYPES}")
    self.mesh.validate()


def evaluate_params(job: EvalJob, params, cfg, tok, mesh=None) -> dict[str, dict]:
  """{task: metrics} of loaded `params` (sharded over `mesh` when given; `job.model_dir` and
  `job.mesh` are the caller's business here)."""
  from minitron_jax.evaluate import qa, scoring

  shots = job.shots()
  out = scoring.run_evaluation(params, cfg, tok, list(job.run_tasks()), data_root=job.data_root,
                               ppl_file=job.ppl_file, seq_len=job.seq_len,
                               max_windows=job.max_windows, limit=job.limit,
                               batch_size=job.batch_size, progress=job.progress, mesh=mesh,
                               num_fewshot=shots, mmlu_only_ok=job.mmlu_only_ok,
                               mmlu_per_subject=job.mmlu_per_subject)
  if (qa_task := job.qa()) is not None:
    name, cap = qa_task
    out[name] = qa.evaluate_qa(params, cfg, tok, name, limit=cap, num_fewshot=shots[name],
                               batch_size=job.batch_size, max_gen_toks=qa.MAX_GEN_TOKS,
                               mesh=mesh, progress=job.progress)
  return out


def harness_results(job: EvalJob, params, cfg, tok, mesh=None) -> dict:
  """lm-evaluation-harness's results dict for `job.harness_tasks`, scored by our backend."""
  import lm_eval
  from lm_eval.tasks import TaskManager

  from minitron_jax.evaluate import harness

  lm = harness.MinitronLM(params=params, cfg=cfg, tokenizer=tok, batch_size=job.batch_size,
                          max_length=job.seq_len, mesh=mesh)
  shots = parse_fewshot(job.num_fewshot).get("*")
  return lm_eval.simple_evaluate(model=lm, tasks=list(job.harness_tasks), num_fewshot=shots,
                                 limit=job.limit,
                                 task_manager=TaskManager(include_path=job.harness_include_path))


def run(job: EvalJob) -> dict:
  """Checks the settings and that the data is there, loads the model, evaluates it; returns
  {"model_dir": resolved directory, "results": {task: metrics}} (also `job.output_json`)."""
  from minitron_jax.evaluate import qa, sources
  from minitron_jax.io import files
  from minitron_jax.io import hf as hf_io

  job.validate()
  sources.require_eval_data(list(job.run_tasks()), job.data_root, ppl_file=job.ppl_file)
  if (qa_task := job.qa()) is not None:
    problems = qa.check_data(qa_task[0])
    if problems:
      raise sources.EvalDataError("\n".join(problems))
  params, cfg, tok, path = hf_io.load_model(job.model_dir, job.dtype)
  mesh = job.mesh.stage_mesh()
  out = {"model_dir": path, "results": evaluate_params(job, params, cfg, tok, mesh)}
  if job.harness_tasks:
    res = harness_results(job, params, cfg, tok, mesh)
    out["harness"] = {k: res[k] for k in ("results", "versions", "n-shot", "higher_is_better")
                      if k in res}
  if job.output_json:
    files.write_json(job.output_json, out)
  return out
