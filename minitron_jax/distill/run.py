"""The training run: data, the loop, held-out evaluation, logging, checkpoints, export.

`fit` trains from arrays (any params, any token stream) and is what tests drive; `run(job)`
runs a `DistillJob` (`distill/job.py`): it loads HF directories and a data source, calls
`fit` and exports the result as an HF directory (or writes a teacher cache). Both
run unchanged on one CPU or many hosts: every process executes the same program on its own
slice of each batch, and only process 0 writes metrics, plots and exports.

Output directory layout:

    checkpoints/<step>/   orbax train state + data position (resumed automatically)
    metrics.jsonl         one JSON row per update, plus `eval/*` rows
                          (written every `log_every` updates: metrics leave the device in
                          windows, so the host never waits on a step)
    losses.png            loss curves
    hf/                   the trained model as an HF directory (tokenizer copied)
    run.json              settings and final numbers
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from minitron_jax import sharding
from minitron_jax.io import checkpoint, lock
from minitron_jax.data import blend, corpus as data, holdout, packing, pipeline
from minitron_jax.distill import losses as distill
from minitron_jax.distill import lora as lora_lib
from minitron_jax.distill import metrics as metrics_lib
from minitron_jax.distill.resume import (DATA_SETTINGS, SCHEDULE_SETTINGS,  # noqa: F401
                                         check_resume, restore_or_init)
from minitron_jax.distill import step as train
from minitron_jax.config import LlamaConfig
from minitron_jax.distill.job import DistillJob, QadSpec  # noqa: F401 (re-exported)
from minitron_jax.distill.step import TrainConfig
from minitron_jax.settings import SettingError

# (params, config, tokenizer) -> (params to start from, transform applied inside the loss)
StudentSetup = Callable[[dict, LlamaConfig, Any], tuple[dict, Callable[[dict], dict]]]



class NonFiniteLossError(RuntimeError):
  """A loss became NaN or infinite; the run stopped without saving the bad state."""


@dataclasses.dataclass
class FitResult:
  """What `fit` returns.

  Attributes:
    params: the trained model params (global arrays, float32).
    step: updates done in total (including those before a resume).
    resumed_from: the checkpoint step the run started from, or None.
    preempted: True if SIGTERM stopped the run early (after saving a checkpoint).
    history: the metric rows of this call's updates (the same on every process).
    evals: the evaluation rows of this call.
    seconds: time spent in training steps in this call (not evaluation or checkpoints).
    tokens: real (non-padding) tokens trained on in this call, over all hosts.
  """

  params: Any
  step: int
  resumed_from: int | None
  preempted: bool
  history: list[dict]
  evals: list[dict]
  seconds: float
  tokens: int


def _is_main() -> bool:
  return jax.process_index() == 0


class _Stop:
  """SIGTERM -> finish the current update, save, and return (preemption)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def agreed(self) -> bool:
    """Whether any process was asked to stop (all processes must stop at the same update)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array([self.requested]))
    return bool(np.any(flags))

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(step: int, metrics: dict[str, float], last_saved: int | None) -> None:
  bad = {k: v for k, v in metrics.items()
         if k.startswith(("distill/", "train/")) and not math.isfinite(v)}
  if bad:
    what = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
    kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
            else "no checkpoint was written")
    raise NonFiniteLossError(f"non-finite loss at step {step}: {what}; the run stopped and {kept}"
                             " (lower the learning rate, or check the data and the models)")


def fit(cfg: TrainConfig, *, model_params: dict, model_cfg: LlamaConfig,
        train_tokens: data.TokenStream, output_dir: str,
        teacher_params: dict | None = None, teacher_cfg: LlamaConfig | None = None,
        dcfg: distill.DistillConfig | None = None, eval_tokens: np.ndarray | None = None,
        projection: np.ndarray | None = None, pad_id: int = 0,
        log: Callable[[str], None] | None = None, lora: lora_lib.LoraSpec | None = None,
        student_transform: Callable[[dict], dict] | None = None,
        teacher_cache: str | None = None, step_hook: train.StepHook | None = None,
        on_saved: Callable[[int], None] | None = None) -> FitResult:
  """Trains `model_params` (distillation from a teacher, or CE in teacher-correction mode).

  Resumes from the latest checkpoint in `output_dir/checkpoints` if there is one.

  Args:
    cfg: train settings (`cfg.mode` picks the objective).
    model_params, model_cfg: the model to train (host arrays, identical on every process).
    train_tokens: the training corpus (a `TokenStream` or `corpus.open_documents`, a blend
      included).
    output_dir: checkpoints and metrics go here.
    teacher_params, teacher_cfg: the frozen teacher (distill mode).
    dcfg: loss settings (distill mode; default `DistillConfig()`).
    eval_tokens: held-out token ids for `cfg.eval_every`.
    projection: initial (D_student, D_teacher) projection; default random when needed.
    pad_id: token id of padding slots.
    log: console sink (process 0); default prints to stdout.
    student_transform: applied to the trained params inside the loss (see
      `train.make_train_step`).
    teacher_cache: a `teacher_cache` directory written for these batches: the step reads the
      teacher's top-K logits from it instead of running the teacher (no teacher params needed).
    step_hook: see `train.make_train_step` (fault injection in tests).
    on_saved: called with the step once each checkpoint is on disk (crash tests).
    lora: train LoRA adapters on `model_params` frozen (`FitResult.params` = the adapters).

  Raises:
    NonFiniteLossError: a loss became NaN/inf (the bad state is never saved).
  """
  log = log or (lambda s: print(s, flush=True))
  say = log if _is_main() else (lambda s: None)
  dcfg, proj, source, cache = _targets(cfg, model_cfg, teacher_cfg, teacher_params, dcfg,
                                       projection, teacher_cache, say)
  live_teacher = isinstance(source, train.LiveTeacher)
  mesh = sharding.make_mesh(cfg.mesh)
  data_index, data_count = train.batch_rows(mesh, cfg)
  optimizer = train.make_optimizer(cfg)
  state_shape, state_sh, fresh_state = _state_layout(model_params, model_cfg, proj, mesh,
                                                     optimizer, lora, cfg)
  teacher_sh = (sharding.param_shardings(teacher_cfg, mesh, params=teacher_params)
                if live_teacher else None)
  ckpt = checkpoint.Checkpointer(os.path.join(output_dir, "checkpoints"),
                                 keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing)
  run_meta = {k: getattr(cfg, k) for k in DATA_SETTINGS + SCHEDULE_SETTINGS}
  resumed_from, state, data_state = restore_or_init(
      ckpt, run_meta, train.abstract(state_shape, state_sh), fresh_state,
      allow_schedule_change=cfg.allow_schedule_change, say=say)
  teacher = train.put_global(teacher_params, teacher_sh) if live_teacher else None

  dataset = _loader(cfg, train_tokens, pad_id, (data_index, data_count), data_state)
  t0 = time.perf_counter()
  step_fn = train.make_train_step(model_cfg, source, dcfg, cfg, optimizer,
                                  grad_shardings=state_sh["params"],
                                  student_transform=student_transform, hook=step_hook, lora=lora)
  compiled, mem = train.compile_step(step_fn, state_sh, teacher_sh, mesh,
                                     train.abstract(state_shape, state_sh),
                                     train.abstract(teacher_params, teacher_sh)
                                     if live_teacher else None, cfg, source)
  say(_compiled_line(cfg, mesh, time.perf_counter() - t0, mem))

  loop = _Loop(cfg, mesh, ckpt, run_meta, output_dir, resumed_from, say, on_saved)
  if cfg.eval_every and eval_tokens is not None:
    loop.set_eval(eval_tokens, train.make_eval_fn(model_cfg, cfg, mesh,
                                                  train.eval_params(state_sh), lora))
    if live_teacher and resumed_from is None:
      loop.evaluate_teacher(train.make_eval_fn(teacher_cfg, cfg, mesh, teacher_sh), teacher)
  with dataset:  # stops the loader's worker processes, if any
    state, preempted = loop.run(compiled, state, teacher, _batches(dataset, cache, mesh, cfg),
                                dataset.state)
  return FitResult(params=state["params"]["model"], step=int(state["step"]),
                   resumed_from=resumed_from, preempted=preempted, history=loop.history,
                   evals=loop.evals, seconds=loop.meter.total_seconds, tokens=loop.tokens)


def _loader(cfg: TrainConfig, train_tokens, pad_id: int, rows: tuple[int, int],
            state: dict | None) -> pipeline.Loader:
  """This process's rows (`rows`: its index and the count of row readers) of every batch."""
  return pipeline.training_loader(train_tokens, seq_len=cfg.seq_len,
                                  global_batch_size=cfg.global_batch_size, seed=cfg.seed,
                                  pad_id=pad_id, process_index=rows[0], process_count=rows[1],
                                  state=state, num_workers=cfg.data_workers)


def _state_layout(model_params, model_cfg: LlamaConfig, proj, mesh, optimizer, lora, cfg):
  """(state shape, state shardings, () -> the fresh sharded train state)."""
  base = None
  if lora is not None:  # the model is the frozen base; fresh adapters train
    base = lora_lib.frozen_base(model_params, cfg.dtype)
    model_params = lora_lib.init_adapters(jax.random.key(cfg.seed), model_cfg, lora)

  def init(params, proj_de, base):
    return train.init_state(params, optimizer, proj_de, base)

  state_shape = jax.eval_shape(init, model_params, proj, base)
  state_sh = train.state_shardings(state_shape, model_cfg, mesh, optimizer)
  return state_shape, state_sh, lambda: jax.jit(init, out_shardings=state_sh)(
      train.put_global(model_params, state_sh["params"]["model"]), proj,
      None if base is None else train.put_global(base, state_sh["base"]))


def _compiled_line(cfg: TrainConfig, mesh, seconds: float, mem) -> str:
  return (f"compiled the {cfg.mode} step in {seconds:.1f}s ({cfg.accum_steps} x {cfg.micro} "
          f"rows x {cfg.seq_len} tokens, mesh {dict(mesh.shape)}); {train.format_memory(mem)}")


def _batches(dataset: pipeline.Loader, cache, mesh, cfg: TrainConfig
             ) -> Callable[[int], dict]:
  """step -> the global batch of update `step` (1-based), with its cached teacher logits if
  the targets come from a cache."""
  def make_batch(step: int) -> dict:
    local = next(dataset)
    if cache is None:
      return train.global_batch(local, mesh, cfg)
    from minitron_jax.distill import teacher_cache as tc
    return tc.batch_with_cache(local, cache.read(step - 1), mesh, cfg, step - 1)
  return make_batch


def _targets(cfg, model_cfg, teacher_cfg, teacher_params, dcfg, projection, teacher_cache, say):
  """(loss settings, initial projection, teacher source, open teacher cache): the distillation
  targets come from a live teacher, or from `teacher_cache`; teacher correction has none."""
  if cfg.mode != "distill" or not teacher_cache:
    dcfg, proj = _check_models(cfg, model_cfg, teacher_cfg, teacher_params, dcfg, projection)
    source = train.LiveTeacher(teacher_cfg) if cfg.mode == "distill" else None
    return dcfg, proj, source, None
  from minitron_jax.distill import teacher_cache as tc

  dcfg = dcfg or distill.DistillConfig()
  distill.check_topk_targets(dcfg)
  cache = tc.TeacherCache(teacher_cache)
  meta = cache.check(cfg, model_cfg.vocab_size, cfg.steps)
  if dcfg.top_k not in (None, meta["k"]):
    raise SettingError("top_k", f"{{name}}={dcfg.top_k} differs from the teacher cache's "
                       f"top-{meta['k']}")
  say(f"reading the teacher's top-{meta['k']} logits from {teacher_cache}")
  return dcfg, None, train.CachedTopK(meta["k"], meta["dtype"]), cache


class _Loop:
  """The host side of the updates: metrics fetched in windows, held-out evaluation,
  checkpoints (with their data position) and preemption; what `fit` reports."""

  def __init__(self, cfg: TrainConfig, mesh, ckpt: checkpoint.Checkpointer, run_meta: dict,
               output_dir: str, resumed_from: int | None, say: Callable[[str], None],
               on_saved: Callable[[int], None] | None):
    self.cfg, self.mesh, self.ckpt, self.run_meta = cfg, mesh, ckpt, run_meta
    self.output_dir, self.say, self.on_saved = output_dir, say, on_saved
    self.start = int(resumed_from or 0)
    self.last_saved = resumed_from
    self.metrics_log = metrics_lib.MetricsLog(os.path.join(output_dir, "metrics.jsonl"),
                                              resumed_from)
    self.meter = metrics_lib.Meter(cfg.steps - self.start)
    self.history, self.evals, self.tokens = [], [], 0
    self.window = []  # (step, metrics still on the device) since the last fetch
    self.windows, self.eval_fn = None, None
    self.t_window = time.perf_counter()

  def set_eval(self, eval_tokens: np.ndarray, eval_fn) -> None:
    """Evaluate on the first `eval_windows` windows of `eval_tokens` with `eval_fn`."""
    tokens = np.asarray(eval_tokens)
    self.windows = packing.eval_windows(tokens, self.cfg.seq_len)[:self.cfg.eval_windows]
    self.eval_fn = eval_fn

  def evaluate_teacher(self, eval_fn, teacher) -> None:
    ref = train.evaluate_windows(eval_fn, teacher, self.windows, self.cfg.micro, self.mesh)
    self.metrics_log.write({"step": 0, "eval/teacher_loss": ref["eval/loss"],
                            "eval/teacher_ppl": ref["eval/ppl"]})
    self.say(f"teacher on held-out data: loss {ref['eval/loss']:.4f}, ppl {ref['eval/ppl']:.2f}")

  def evaluate(self, params, step: int) -> None:
    row = {"step": step, **train.evaluate_windows(self.eval_fn, params, self.windows,
                                                  self.cfg.micro, self.mesh)}
    self.say(f"eval at step {step}: loss {row['eval/loss']:.4f}, ppl {row['eval/ppl']:.2f}")
    self.evals.append(row)
    self.metrics_log.write(row)

  def fetch(self) -> dict | None:
    """The window's metrics to the host in one transfer (no other per-step wait on the device).

    Checks every row, so a non-finite loss is reported at the step where it first appeared;
    rows before it are kept and the bad state is never saved (saves follow a fetch).
    """
    if not self.window:
      return None
    steps, fetched = zip(*self.window)
    self.window = []
    rows = [{"step": s, **{k: float(v) for k, v in m.items()}}
            for s, m in zip(steps, jax.device_get(list(fetched)))]
    self.meter.add(sum(int(r["train/tokens"]) for r in rows), time.perf_counter() - self.t_window,
                   len(rows))
    for row in rows:
      try:
        _check_finite(row["step"], row, self.last_saved)
      except NonFiniteLossError:
        self.ckpt.close()  # let the last good save finish; the bad state is never saved
        raise
      self.history.append(row)
      self.metrics_log.write(row)
      self.tokens += int(row["train/tokens"])
    return rows[-1]

  def run(self, compiled, state, teacher, make_batch: Callable[[int], dict],
          data_state: Callable[[], dict]) -> tuple[Any, bool]:
    """Updates `start + 1 .. steps`; returns (final state, whether SIGTERM stopped the run)."""
    if self.windows is not None and self.start == 0:
      self.evaluate(train.eval_params(state), 0)
    preempted = False
    with _Stop() as stop:
      pending = None
      self.t_window = time.perf_counter()
      for step in range(self.start + 1, self.cfg.steps + 1):
        batch, data_after = pending or (make_batch(step), data_state())
        state, metrics = compiled(state, teacher, batch)
        self.window.append((step, metrics))
        pending = None
        if step < self.cfg.steps:  # build the next batch on the host while the device works
          pending = (make_batch(step + 1), data_state())
        fetched, stopping = self._after_update(step, state, data_after, stop)
        if stopping:
          preempted = True
          self.say(f"SIGTERM: saved the checkpoint at step {step}; run the same command to "
                   "resume")
          break
        if fetched:  # evaluation and checkpoint time is not training time
          self.t_window = time.perf_counter()
    if self.windows is not None and not preempted:
      self.evaluate(train.eval_params(state), self.cfg.steps)
    self.ckpt.close()
    if _is_main() and os.path.isfile(self.metrics_log.path):
      metrics_lib.plot_losses(self.metrics_log.path, os.path.join(self.output_dir, "losses.png"))
    return state, preempted

  def _after_update(self, step: int, state, data_after: dict, stop: _Stop) -> tuple[bool, bool]:
    """Logging, evaluation and checkpointing after update `step`: (fetched, stopping)."""
    cfg = self.cfg
    printing = step % cfg.log_every == 0 or step == cfg.steps or step == self.start + 1
    evaluating = self.windows is not None and step % cfg.eval_every == 0 and step != cfg.steps
    saving = step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0)
    fetched = printing or evaluating or saving
    if fetched:
      row = self.fetch()
      if printing:
        self.say(metrics_lib.format_row(row, cfg.steps, *self.meter.report()))
    if evaluating:
      self.evaluate(train.eval_params(state), step)
    stopping = stop.agreed()
    if stopping and not fetched:
      self.fetch()
      fetched = True
    if stopping or saving:
      if self.ckpt.save(step, state, {"data": data_after, "run": self.run_meta, "step": step}):
        self.last_saved = step
      if self.on_saved is not None:
        self.ckpt.wait()
        self.on_saved(step)
    return fetched, stopping


def _check_models(cfg, model_cfg, teacher_cfg, teacher_params, dcfg, projection):
  """Validates the pairing and returns (dcfg with a resolved layer map, initial projection)."""
  if cfg.mode != "distill":
    return None, None
  if teacher_params is None or teacher_cfg is None:
    raise ValueError("distillation needs a teacher (teacher_params and teacher_cfg)")
  if teacher_cfg.vocab_size != model_cfg.vocab_size:
    raise ValueError(f"teacher vocab {teacher_cfg.vocab_size} != student vocab "
                     f"{model_cfg.vocab_size}: logits distillation needs one tokenizer")
  dcfg = dcfg or distill.DistillConfig()
  if dcfg.needs_hidden:
    dcfg = dataclasses.replace(dcfg, layer_map=distill.resolve_layer_map(
        dcfg.layer_map, model_cfg.num_hidden_layers, teacher_cfg.num_hidden_layers))
  d, e = model_cfg.hidden_size, teacher_cfg.hidden_size
  if not dcfg.needs_projection_loss or d == e:
    return dcfg, None
  if projection is None:
    return dcfg, distill.init_projection(jax.random.key(cfg.seed), d, e)
  projection = np.asarray(projection, np.float32)
  if projection.shape != (d, e):
    raise ValueError(f"projection has shape {projection.shape}, expected {(d, e)}")
  return dcfg, projection


# ---------------------------------------------------------------------------- from directories


def _from_report(path: str, dcfg: distill.DistillConfig, student: LlamaConfig,
                 teacher: LlamaConfig) -> tuple[distill.DistillConfig, np.ndarray | None]:
  """(dcfg with the report's layer map, selection projection or None) of a pruning report."""
  if dcfg.layer_map is None:
    dcfg = dataclasses.replace(dcfg, layer_map=distill.layer_map_from_report(path))
  kept = distill.kept_embed_from_report(path)
  if (kept is None or not dcfg.needs_projection_loss
      or student.hidden_size == teacher.hidden_size):
    return dcfg, None
  if len(kept) != student.hidden_size:
    raise ValueError(f"{path}: kept.embed has {len(kept)} channels, the student has "
                     f"{student.hidden_size}")
  return dcfg, distill.selection_projection(kept, teacher.hidden_size)


def run(job: DistillJob, *, student_setup: StudentSetup | None = None,
        on_saved: Callable[[int], None] | None = None) -> dict:
  """Runs a distillation job: distils `job.student_dir` from `job.teacher_dir` (or corrects the
  teacher, or writes a teacher cache) and exports the result as an HF directory.

  Args:
    job: the settings; validated here before anything is loaded.
    student_setup: given the student's params, config and tokenizer, (the params to start
      from, the transform applied to them inside the loss). Required with `job.qad`:
      quantization-aware distillation's setup (`quantize.qad.QadSetup(job.qad, job.data)`).
    on_saved: see `fit`.

  Returns:
    A summary (also written to `output_dir/run.json`; for a cache write, the cache's figures).
  """
  job.validate()
  if job.qad is not None and student_setup is None:
    raise SettingError("qad.format", "{name} needs the quantization setup of the student "
                       "(quantize.qad.QadSetup)")
  if job.lora is not None and job.lora.base_format and student_setup is None:
    raise SettingError("lora.base_format", "{name} needs the quantization of the base "
                       "(quantize.formats.QuantizedBase)")
  sharding.initialize_distributed(job.coordinator_address, job.num_processes, job.process_id)
  with lock.lock_directory(job.output_dir, "output directory", jax.process_index()):
    return _run(job, student_setup, on_saved)


def _run(job: DistillJob, student_setup, on_saved) -> dict:
  from minitron_jax.io import hf as hf_io

  models = _load_models(job)
  tok, tok_dir = _tokenizer(models.path, models.teacher_path)
  stream, eval_ids = _training_tokens(job, tok)
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  pad_id = int(pad_id or 0)
  if job.writing_cache:
    from minitron_jax.distill import teacher_cache as tc
    return tc.write_for_run(job.teacher_cache, job.train, models.teacher, models.teacher_cfg,
                            stream, job.cache_topk, job.cache_dtype, pad_id)
  dcfg, projection, report = job.loss, None, job.prune_report
  if job.distilling:
    dcfg, projection, report = _student_losses(job, models.path, models.cfg, models.teacher_cfg)
  params, transform = models.params, None
  if student_setup is not None:
    params, transform = student_setup(params, models.cfg, tok)
  result = fit(job.train, model_params=params, model_cfg=models.cfg, train_tokens=stream,
               output_dir=job.output_dir, teacher_params=models.teacher,
               teacher_cfg=models.teacher_cfg, dcfg=dcfg if job.distilling else None,
               eval_tokens=eval_ids, projection=projection, pad_id=pad_id,
               student_transform=transform, teacher_cache=job.teacher_cache,
               on_saved=on_saved, lora=job.lora)
  summary = {"mode": job.train.mode, "teacher_dir": models.teacher_path,
             "student_dir": models.path if job.distilling else None,
             "steps": result.step, "resumed_from": result.resumed_from,
             "preempted": result.preempted, "tokens_this_run": result.tokens,
             "seconds_this_run": round(result.seconds, 2),
             "evals": result.evals, "train_config": dataclasses.asdict(job.train),
             "distill_config": dataclasses.asdict(dcfg) if job.distilling else None,
             "lora": dataclasses.asdict(job.lora) if job.lora is not None else None,
             "prune_report": os.path.abspath(report) if report else None}
  if result.preempted:
    return summary
  export_dtype = "float32" if job.qad is not None else job.export_dtype
  merge = None
  if job.lora is not None:  # export the adapters merged into the base (and as PEFT)
    merge = functools.partial(lora_lib.export, base=params, spec=job.lora, write=_is_main(),
                              output_dir=job.output_dir, base_model=models.path)
  return _export(summary, result, models, job.output_dir, tok_dir, export_dtype, hf_io, merge)


@dataclasses.dataclass(frozen=True)
class _Models:
  """What a job loaded: the trained model (`params` None when only writing a cache) and the
  teacher (`teacher` None when its logits come from a cache, or in teacher correction)."""
  params: Any
  cfg: LlamaConfig | None
  path: str
  teacher: Any
  teacher_cfg: LlamaConfig | None
  teacher_path: str
  src_dtype: str | None


def _load_models(job: DistillJob) -> _Models:
  from minitron_jax.io import hf as hf_io

  if job.teacher_cache and not job.writing_cache:  # logits on disk: the config is enough
    from minitron_jax.io import registry
    tpath = str(registry.resolve_model_dir(job.teacher_dir))
    teacher, tcfg = None, hf_io.load_config(tpath)
  else:
    teacher, tcfg, _, tpath = hf_io.load_model(job.teacher_dir, with_tokenizer=False)
  if job.writing_cache:
    params, mcfg, path = None, None, tpath
  elif job.distilling:
    params, mcfg, _, path = hf_io.load_model(job.student_dir, with_tokenizer=False)
  else:  # teacher correction: the teacher is the trained model
    params, mcfg, path = teacher, tcfg, tpath
    teacher = tcfg = None
  src_dtype = (str(np.dtype(jax.tree_util.tree_leaves(params)[0].dtype)) if params is not None
               else None)
  return _Models(params, mcfg, path, teacher, tcfg, tpath, src_dtype)


def _tokenizer(path: str, teacher_path: str):
  """(tokenizer, its directory): a pruned student may come without tokenizer files; it
  shares the teacher's."""
  from minitron_jax.io import hf as hf_io

  try:
    return hf_io.load_tokenizer(path), path
  except FileNotFoundError:
    return hf_io.load_tokenizer(teacher_path), teacher_path


def _training_tokens(job: DistillJob, tok):
  """(training documents, held-out ids or None): `eval_data`, else the training data's tail."""
  cfg = job.train
  docs = data.open_documents(job.data, tok)
  if not cfg.eval_every:
    return docs, None
  if job.eval_data:
    return docs, np.asarray(data.load_tokens(job.eval_data, tok).tokens)
  if isinstance(docs, blend.Blend) and len(docs.parts) > 1:  # its first source's tail
    train, held = holdout.split_holdout(data.to_stream(docs.parts[0]),
                                        cfg.eval_windows * cfg.seq_len)
    return blend.Blend([train, *docs.parts[1:]], docs.weights, docs.name), held
  return holdout.split_holdout(data.to_stream(docs), cfg.eval_windows * cfg.seq_len)


def _student_losses(job: DistillJob, path: str, mcfg: LlamaConfig, tcfg: LlamaConfig):
  """(loss settings, initial projection or None, pruning report or None) of the student."""
  report = job.prune_report
  found = os.path.join(path, "prune_report.json")
  if not report and os.path.isfile(found):
    report = found  # pruning writes its report into the student directory
    print(f"using the pruning report {found}", flush=True)
  if not report:
    return job.loss, None, None
  dcfg, projection = _from_report(report, job.loss, mcfg, tcfg)
  return dcfg, projection, report


def _export(summary: dict, result: FitResult, models: _Models, output_dir: str, tok_dir: str,
            export_dtype: str | None, hf_io, merge: Callable[[Any], Any] | None = None) -> dict:
  """Writes `output_dir/hf` and `run.json` on process 0; every process joins the gather.
  `merge` maps the gathered trained params to the exported model (LoRA's adapters)."""
  from minitron_jax.io import files

  host = sharding.host_params(result.params)
  host = host if merge is None else merge(host)
  hf_dir = os.path.join(output_dir, "hf")
  if _is_main():
    hf_io.save_hf(host, models.cfg.replace(dtype="float32"), hf_dir, source_dir=tok_dir,
                  dtype=export_dtype or models.src_dtype, overwrite=True)
    summary["hf_dir"] = os.path.abspath(hf_dir)
    files.write_json(os.path.join(output_dir, "run.json"), summary)
    print(f"wrote {hf_dir}", flush=True)
  return summary
