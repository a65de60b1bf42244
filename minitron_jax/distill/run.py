"""The training run: data, the loop, held-out evaluation, logging, checkpoints, export.

`fit` trains from arrays (any params, any token stream) and is what tests drive; `run` loads
HF directories and a data source, calls `fit` and exports the result as an HF directory. Both
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
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from minitron_jax import sharding
from minitron_jax.io import checkpoint
from minitron_jax.data import corpus as data, packing
from minitron_jax.distill import losses as distill
from minitron_jax.distill import step as train
from minitron_jax import plots
from minitron_jax.config import LlamaConfig
from minitron_jax.distill.step import TrainConfig

LOSS_CURVES = ("distill/loss", "distill/kl", "distill/hidden", "distill/ce", "train/ce")

# Settings a resume must keep, saved with every checkpoint. The data settings fix the batches,
# their order and the units of the saved data position; the schedule settings fix the learning
# rate of every later update (`TrainConfig.allow_schedule_change` lets those change).
DATA_SETTINGS = ("mode", "global_batch_size", "seq_len", "seed")
SCHEDULE_SETTINGS = ("steps", "lr", "min_lr", "warmup_steps")


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


def split_holdout(stream: data.TokenStream, num_tokens: int
                  ) -> tuple[data.TokenStream, np.ndarray]:
  """Holds out the tail of a stream for evaluation: (training stream, held-out token ids).

  The cut moves back to a document boundary when one lies in the second half of the stream, so
  held-out documents are unseen whole.
  """
  n = len(stream)
  if num_tokens < 1 or 2 * num_tokens > n:
    raise ValueError(f"cannot hold out {num_tokens} of {n} tokens for evaluation: the corpus "
                     "is too small (lower eval_windows or seq_len, or pass eval data)")
  cut = n - num_tokens
  offsets = np.asarray(stream.offsets)
  bounds = offsets[(offsets >= n // 2) & (offsets <= cut)]
  if len(bounds):
    cut = int(bounds.max())
  train_offsets = np.unique(np.concatenate([offsets[offsets < cut], [cut]])).astype(np.int64)
  tokens = np.asarray(stream.tokens)
  return data.TokenStream(tokens[:cut], train_offsets), tokens[cut:]


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


class _MetricsLog:
  """metrics.jsonl on process 0; rows after the resumed step (from a crash) are dropped."""

  def __init__(self, path: str, resume_step: int | None):
    self.path = path
    if not _is_main():
      return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = read_metrics(path) if os.path.isfile(path) else []
    keep = [r for r in rows if resume_step is not None and r.get("step", 0) <= resume_step]
    with open(path, "w", encoding="utf-8") as f:
      for r in keep:
        f.write(json.dumps(r) + "\n")

  def write(self, row: dict) -> None:
    if _is_main():
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class _Meter:
  """Tokens/s since the last report and ETA, over training steps only (not eval or saves)."""

  def __init__(self, steps_left: int):
    self.steps_left = steps_left
    self.total_seconds = 0.0
    self.steps_done = 0
    self._tokens = 0
    self._seconds = 0.0

  def add(self, tokens: int, seconds: float, steps: int = 1) -> None:
    """`steps` updates that trained on `tokens` tokens in `seconds` of wall time."""
    self.steps_left -= steps
    self.total_seconds += seconds
    self._tokens += tokens
    self._seconds += seconds
    self.steps_done += steps

  def report(self) -> tuple[float, float]:
    """(tokens per second since the last report, seconds left at the mean step time)."""
    rate = self._tokens / max(self._seconds, 1e-9)
    eta = self.total_seconds / max(self.steps_done, 1) * self.steps_left
    self._tokens, self._seconds = 0, 0.0
    return rate, eta


def _check_finite(step: int, metrics: dict[str, float], last_saved: int | None) -> None:
  bad = {k: v for k, v in metrics.items()
         if k.startswith(("distill/", "train/")) and not math.isfinite(v)}
  if bad:
    what = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
    kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
            else "no checkpoint was written")
    raise NonFiniteLossError(f"non-finite loss at step {step}: {what}; the run stopped and {kept}"
                             " (lower --lr, or check the data and the models)")


def _format_row(row: dict, total: int, tok_s: float, eta_s: float) -> str:
  keys = ("distill/loss", "distill/kl", "distill/hidden", "distill/embedding", "distill/ce",
          "train/loss")
  parts = [f"{k.split('/')[1] if k != 'train/loss' else 'loss'} {row[k]:.4f}"
           for k in keys if k in row and not (k == "train/loss" and "distill/loss" in row)]
  eta = time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0))) if math.isfinite(eta_s) else "?"
  return (f"step {row['step']}/{total} | " + " ".join(parts)
          + f" | lr {row['train/lr']:.2e} | {tok_s:,.0f} tok/s | ETA {eta}")


def fit(cfg: TrainConfig, *, model_params: dict, model_cfg: LlamaConfig,
        train_tokens: data.TokenStream, output_dir: str,
        teacher_params: dict | None = None, teacher_cfg: LlamaConfig | None = None,
        dcfg: distill.DistillConfig | None = None, eval_tokens: np.ndarray | None = None,
        projection: np.ndarray | None = None, pad_id: int = 0,
        log: Callable[[str], None] | None = None,
        student_transform: Callable[[dict], dict] | None = None,
        teacher_cache: str | None = None) -> FitResult:
  """Trains `model_params` (distillation from a teacher, or CE in teacher-correction mode).

  Resumes from the latest checkpoint in `output_dir/checkpoints` if there is one.

  Args:
    cfg: train settings (`cfg.mode` picks the objective).
    model_params, model_cfg: the model to train (host arrays, identical on every process).
    train_tokens: the training corpus.
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

  Raises:
    NonFiniteLossError: a loss became NaN/inf (the bad state is never saved).
  """
  log = log or (lambda s: print(s, flush=True))
  say = log if _is_main() else (lambda s: None)
  distilling = cfg.mode == "distill"
  cache = None
  if distilling and teacher_cache:
    from minitron_jax.distill import teacher_cache as tc
    if student_transform is not None:
      raise ValueError("--teacher_cache cannot be combined with --qad_format: the cached step "
                       "trains float weights only")
    dcfg, proj = dcfg or distill.DistillConfig(), None
    tc.check_loss_settings(dcfg)
    cache = tc.TeacherCache(teacher_cache)
    cache_meta = cache.check(cfg, model_cfg.vocab_size, cfg.steps)
    if dcfg.top_k not in (None, cache_meta["k"]):
      raise ValueError(f"--kd_top_k={dcfg.top_k} differs from the teacher cache's top-"
                       f"{cache_meta['k']}")
    say(f"reading the teacher's top-{cache_meta['k']} logits from {teacher_cache}")
  else:
    dcfg, proj = _check_models(cfg, model_cfg, teacher_cfg, teacher_params, dcfg, projection)
  live_teacher = distilling and cache is None
  mesh = sharding.make_mesh(cfg.mesh)
  data_index, data_count = train.batch_rows(mesh, cfg)
  optimizer = train.make_optimizer(cfg)

  def init(params, proj_de):
    return train.init_state(params, optimizer, proj_de)

  state_shape = jax.eval_shape(init, model_params, proj)
  state_sh = train.state_shardings(state_shape, model_cfg, mesh, optimizer)
  teacher_sh = (sharding.param_shardings(teacher_cfg, mesh, params=teacher_params)
                if live_teacher else None)

  ckpt = checkpoint.Checkpointer(os.path.join(output_dir, "checkpoints"),
                                 keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing)
  run_meta = {k: getattr(cfg, k) for k in DATA_SETTINGS + SCHEDULE_SETTINGS}
  resumed_from, state, data_state = _restore_or_init(
      ckpt, run_meta, train.abstract(state_shape, state_sh),
      lambda: jax.jit(init, out_shardings=state_sh)(
          train.put_global(model_params, state_sh["params"]["model"]), proj),
      allow_schedule_change=cfg.allow_schedule_change)
  if resumed_from is not None:
    say(f"resuming from the checkpoint at step {resumed_from}")
  teacher = train.put_global(teacher_params, teacher_sh) if live_teacher else None

  dataset = packing.PackedDataset(train_tokens, seq_len=cfg.seq_len,
                               global_batch_size=cfg.global_batch_size, seed=cfg.seed,
                               pad_id=pad_id, process_index=data_index,
                               process_count=data_count, state=data_state)
  t0 = time.perf_counter()
  if cache is None:
    step_fn = train.make_train_step(model_cfg, teacher_cfg, dcfg, cfg, optimizer,
                                    grad_shardings=state_sh["params"],
                                    student_transform=student_transform)
    compiled, mem = train.compile_step(step_fn, state_sh, teacher_sh, mesh,
                                       train.abstract(state_shape, state_sh),
                                       train.abstract(teacher_params, teacher_sh)
                                       if distilling else None, cfg)
  else:
    compiled, mem = tc.compile_step(
        tc.make_step(model_cfg, dcfg, cfg, optimizer, grad_shardings=state_sh["params"]),
        state_sh, mesh, train.abstract(state_shape, state_sh), cfg, cache_meta["k"],
        cache_meta["dtype"])
  say(f"compiled the {cfg.mode} step in {time.perf_counter() - t0:.1f}s "
      f"({cfg.accum_steps} x {cfg.micro} rows x {cfg.seq_len} tokens, mesh "
      f"{dict(mesh.shape)}); {train.format_memory(mem)}")

  windows = None
  if cfg.eval_every and eval_tokens is not None:
    windows = packing.eval_windows(np.asarray(eval_tokens), cfg.seq_len)[:cfg.eval_windows]
    eval_fn = train.make_eval_fn(model_cfg, cfg, mesh, state_sh["params"]["model"])

  def evaluate(step):
    row = {"step": step, **train.evaluate_windows(eval_fn, state["params"]["model"], windows,
                                                  cfg.micro, mesh)}
    say(f"eval at step {step}: loss {row['eval/loss']:.4f}, ppl {row['eval/ppl']:.2f}")
    return row

  metrics_log = _MetricsLog(os.path.join(output_dir, "metrics.jsonl"), resumed_from)
  start = int(resumed_from or 0)
  history, evals, tokens, last_saved = [], [], 0, resumed_from
  if windows is not None and start == 0:
    if live_teacher:
      t_fn = train.make_eval_fn(teacher_cfg, cfg, mesh, teacher_sh)
      ref = train.evaluate_windows(t_fn, teacher, windows, cfg.micro, mesh)
      metrics_log.write({"step": 0, "eval/teacher_loss": ref["eval/loss"],
                         "eval/teacher_ppl": ref["eval/ppl"]})
      say(f"teacher on held-out data: loss {ref['eval/loss']:.4f}, ppl {ref['eval/ppl']:.2f}")
    evals.append(evaluate(0))
    metrics_log.write(evals[-1])

  def make_batch(step: int) -> dict:
    """The global batch of update `step` (1-based), with its cached teacher logits if any."""
    local = next(dataset)
    if cache is None:
      return train.global_batch(local, mesh, cfg)
    return tc.batch_with_cache(local, cache.read(step - 1), mesh, cfg, step - 1)

  preempted = False
  meter = _Meter(cfg.steps - start)
  window = []  # (step, metrics still on the device) since the last fetch
  with _Stop() as stop:
    pending = None
    t_window = time.perf_counter()

    def fetch() -> dict | None:
      """The window's metrics to the host in one transfer (no other per-step wait on the device).

      Checks every row, so a non-finite loss is reported at the step where it first appeared;
      rows before it are kept and the bad state is never saved (saves follow a fetch).
      """
      nonlocal window, tokens
      if not window:
        return None
      steps, fetched = zip(*window)
      window = []
      rows = [{"step": s, **{k: float(v) for k, v in m.items()}}
              for s, m in zip(steps, jax.device_get(list(fetched)))]
      meter.add(sum(int(r["train/tokens"]) for r in rows), time.perf_counter() - t_window,
                len(rows))
      for row in rows:
        try:
          _check_finite(row["step"], row, last_saved)
        except NonFiniteLossError:
          ckpt.close()  # let the last good save finish; the bad state is never saved
          raise
        history.append(row)
        metrics_log.write(row)
        tokens += int(row["train/tokens"])
      return rows[-1]

    for step in range(start + 1, cfg.steps + 1):
      batch, data_after = pending or (make_batch(step), dataset.state())
      state, metrics = compiled(state, teacher, batch)
      window.append((step, metrics))
      pending = None
      if step < cfg.steps:  # build the next batch on the host while the device works
        pending = (make_batch(step + 1), dataset.state())
      printing = step % cfg.log_every == 0 or step == cfg.steps or step == start + 1
      evaluating = windows is not None and step % cfg.eval_every == 0 and step != cfg.steps
      saving = step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0)
      fetched = printing or evaluating or saving
      if fetched:
        row = fetch()
        if printing:
          say(_format_row(row, cfg.steps, *meter.report()))
      if evaluating:
        evals.append(evaluate(step))
        metrics_log.write(evals[-1])
      stopping = stop.agreed()
      if stopping and not fetched:
        fetch()
        fetched = True
      if stopping or saving:
        if ckpt.save(step, state, {"data": data_after, "run": run_meta, "step": step}):
          last_saved = step
        if cfg.crash_after_save_step == step:
          ckpt.wait()
          os.kill(os.getpid(), signal.SIGKILL)
      if stopping:
        preempted = True
        say(f"SIGTERM: saved the checkpoint at step {step}; run the same command to resume")
        break
      if fetched:  # evaluation and checkpoint time is not training time
        t_window = time.perf_counter()
  seconds = meter.total_seconds
  if windows is not None and not preempted:
    evals.append(evaluate(cfg.steps))
    metrics_log.write(evals[-1])
  ckpt.close()
  if _is_main() and os.path.isfile(metrics_log.path):
    plot_losses(metrics_log.path, os.path.join(output_dir, "losses.png"))
  return FitResult(params=state["params"]["model"], step=int(state["step"]),
                   resumed_from=resumed_from, preempted=preempted, history=history,
                   evals=evals, seconds=seconds, tokens=tokens)


def _restore_or_init(ckpt: checkpoint.Checkpointer, run_meta: dict, abstract_state,
                     init: Callable[[], Any], allow_schedule_change: bool = False
                     ) -> tuple[int | None, Any, dict | None]:
  """(resumed step or None, state, data position) from the latest checkpoint, else fresh."""
  step = ckpt.latest_step()
  if step is None:
    return None, init(), None
  state, meta = ckpt.restore(step, abstract_state)
  check_resume(meta.get("run", {}), run_meta, ckpt.directory, allow_schedule_change)
  return step, state, meta["data"]


def check_resume(saved: dict, current: dict, directory: str,
                 allow_schedule_change: bool = False) -> None:
  """Refuses to resume with settings that differ from the checkpoint's, in one line.

  Checkpoints written before the schedule settings were recorded lack them; those are not
  checked (nothing to compare with).

  Raises:
    ValueError: naming each differing setting, its saved and its new value.
  """
  differ = [k for k, v in current.items()
            if saved.get(k) != v and not (k in SCHEDULE_SETTINGS and k not in saved)]
  if allow_schedule_change:
    differ = [k for k in differ if k not in SCHEDULE_SETTINGS]
  if not differ:
    return
  what = ", ".join(f"{k} (saved {saved.get(k)!r}, now {current[k]!r})" for k in differ)
  how = "rerun with the saved values or use a new --output_dir"
  if all(k in SCHEDULE_SETTINGS for k in differ):
    how += ", or pass --allow_schedule_change to continue on the new learning-rate schedule"
  raise ValueError(f"{directory}: cannot resume: this run changes settings the checkpoint was "
                   f"written with: {what}; {how}")


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


def plot_losses(metrics_path: str, png_path: str) -> None:
  """Loss curves (log scale) and held-out loss from metrics.jsonl."""
  rows = read_metrics(metrics_path)
  curves = [(key, [(r["step"], r[key]) for r in rows if key in r and r[key] > 0], "-", 1.2)
            for key in LOSS_CURVES]
  curves.append(("eval/loss (held out)",
                 [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r], "o--", 1.2))
  plots.line_chart(curves, png_path)


# ---------------------------------------------------------------------------- from directories


def host_params(params):
  """Every process gets full host copies (collective); a single process keeps device arrays."""
  if jax.process_count() == 1:
    return params
  from jax.experimental import multihost_utils
  return jax.tree_util.tree_map(lambda x: np.asarray(multihost_utils.process_allgather(
      x, tiled=True)), params)


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


def run(cfg: TrainConfig, *, teacher_dir: str, output_dir: str, student_dir: str | None = None,
        data_source: str = data.SHAKESPEARE, eval_data: str | None = None,
        dcfg: distill.DistillConfig | None = None, prune_report: str | None = None,
        export_dtype: str | None = None, coordinator_address: str | None = None,
        num_processes: int | None = None, process_id: int | None = None,
        student_setup: Callable[[dict, LlamaConfig, Any], tuple[dict, Callable[[dict], dict]]]
        | None = None,
        teacher_cache: str | None = None, cache_teacher_topk: int = 0,
        cache_dtype: str = "float32") -> dict:
  """Distils `student_dir` from `teacher_dir` (or corrects the teacher) and exports HF.

  Args:
    cfg: train settings; `cfg.mode="teacher_correction"` fine-tunes the teacher alone.
    teacher_dir, student_dir: HF directories or short names (`hf_io.load_model`).
    output_dir: checkpoints, metrics, plot, and the result under `output_dir/hf`.
    data_source: training corpus (see `data.load_texts`); default the bundled Shakespeare.
    eval_data: held-out corpus; default the tail of `data_source`.
    dcfg: loss settings (distill mode).
    prune_report: the student's pruning report (default: `prune_report.json` in the student
      directory, if present): its kept layers become the layer map (unless `dcfg` has one)
      and its kept embedding channels the projection's starting point.
    export_dtype: dtype of the exported tensors; default that of the trained checkpoint.
    coordinator_address, num_processes, process_id: multi-host settings (or the cluster's
      environment).
    student_setup: given the student's params, config and tokenizer, (the params to start
      from, the transform applied to them inside the loss): quantization-aware distillation
      (`quantize.qad`: a fake-quantization transform, or a calibrated model's frozen grid).
    teacher_cache: a `teacher_cache` directory: with `cache_teacher_topk`, write the teacher's
      top-K logits of this run's batches there (resumable) and stop; without, distil from it
      (the teacher's weights are not loaded).
    cache_teacher_topk: K of the cache to write (0 = read `teacher_cache`).
    cache_dtype: dtype of the cached logits (float32 or bfloat16).

  Returns:
    A summary (also written to `output_dir/run.json`; for a cache write, the cache's figures).
  """
  from minitron_jax.io import files
  from minitron_jax.io import hf as hf_io

  sharding.initialize_distributed(coordinator_address, num_processes, process_id)
  distilling = cfg.mode == "distill"
  if distilling and not student_dir and not cache_teacher_topk:
    raise ValueError("distillation needs --student_dir (or use --mode=teacher_correction)")
  writing = bool(cache_teacher_topk)
  if writing and not teacher_cache:
    raise ValueError("--cache_teacher_topk needs --teacher_cache=DIR to write to")
  if teacher_cache and not distilling:
    raise ValueError("--teacher_cache is for distillation (--mode=distill)")
  if teacher_cache and not writing:  # the logits are on disk: the teacher's config is enough
    from minitron_jax.io import registry
    tpath = str(registry.resolve_model_dir(teacher_dir))
    teacher, tcfg = None, hf_io.load_config(tpath)
  else:
    teacher, tcfg, _, tpath = hf_io.load_model(teacher_dir, with_tokenizer=False)
  if writing:
    params, mcfg, path = None, None, tpath
  elif distilling:
    params, mcfg, _, path = hf_io.load_model(student_dir, with_tokenizer=False)
  else:
    params, mcfg, path = teacher, tcfg, tpath
    teacher = tcfg = None
  try:  # a pruned student may come without tokenizer files; it shares the teacher's
    tok, tok_dir = hf_io.load_tokenizer(path), path
  except FileNotFoundError:
    tok, tok_dir = hf_io.load_tokenizer(tpath), tpath
  src_dtype = (str(np.dtype(jax.tree_util.tree_leaves(params)[0].dtype)) if params is not None
               else None)
  stream = data.load_tokens(data_source, tok)
  eval_ids = None
  if cfg.eval_every:
    if eval_data:
      eval_ids = np.asarray(data.load_tokens(eval_data, tok).tokens)
    else:
      stream, eval_ids = split_holdout(stream, cfg.eval_windows * cfg.seq_len)
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  if writing:
    from minitron_jax.distill import teacher_cache as tc
    return tc.write_for_run(teacher_cache, cfg, teacher, tcfg, stream, cache_teacher_topk,
                            cache_dtype, int(pad_id or 0))
  projection = None
  found = os.path.join(path, "prune_report.json")
  if distilling and not prune_report and os.path.isfile(found):
    prune_report = found  # pruning writes its report into the student directory
    print(f"using the pruning report {found}", flush=True)
  if distilling and prune_report:
    dcfg, projection = _from_report(prune_report, dcfg or distill.DistillConfig(), mcfg, tcfg)
  transform = None
  if student_setup is not None:
    params, transform = student_setup(params, mcfg, tok)
  result = fit(cfg, model_params=params, model_cfg=mcfg, train_tokens=stream,
               output_dir=output_dir, teacher_params=teacher, teacher_cfg=tcfg, dcfg=dcfg,
               eval_tokens=eval_ids, projection=projection, pad_id=int(pad_id or 0),
               student_transform=transform,
               teacher_cache=teacher_cache)
  summary = {"mode": cfg.mode, "teacher_dir": tpath, "student_dir": path if distilling else None,
             "steps": result.step, "resumed_from": result.resumed_from,
             "preempted": result.preempted, "tokens_this_run": result.tokens,
             "seconds_this_run": round(result.seconds, 2),
             "evals": result.evals, "train_config": dataclasses.asdict(cfg),
             "distill_config": dataclasses.asdict(dcfg) if dcfg else None,
             "prune_report": os.path.abspath(prune_report) if prune_report else None}
  if result.preempted:
    return summary
  host = host_params(result.params)
  hf_dir = os.path.join(output_dir, "hf")
  if _is_main():
    hf_io.save_hf(host, mcfg.replace(dtype="float32"), hf_dir, source_dir=tok_dir,
                  dtype=export_dtype or src_dtype, overwrite=True)
    summary["hf_dir"] = os.path.abspath(hf_dir)
    files.write_json(os.path.join(output_dir, "run.json"), summary)
    print(f"wrote {hf_dir}", flush=True)
  return summary
