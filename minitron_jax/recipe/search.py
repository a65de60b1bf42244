"""The search run: budget -> candidates -> one-shot scores -> short distillation -> winner.

Importance (width units and per-layer block importance) is computed once on the teacher and
every candidate's plan is read from it, so scoring a candidate costs one pruning and one
held-out evaluation. The `top_k` best one-shot candidates are then distilled from the teacher
for `search_steps` updates on the same tokens each (the same seed, so the same batches) and
re-ranked by held-out loss, because one-shot rankings flip after retraining (Minitron report).
The short distillations read the teacher's top-`teacher_topk` logits of their batches from one
cache, written by a single teacher pass (`distill/teacher_cache.py`): the teacher runs once
for all `top_k` candidates, not once per candidate. With `score_task`, every candidate is also
scored one-shot on that zero-shot task, and the one-shot ranking is by its accuracy (ModelOpt's
"score function after pruning"); the held-out loss breaks ties.
The winner is written as a pruned HF directory (one-shot weights, ready for the full
distillation) with `prune_report.json`, `importance.npz`, `search_report.json` and `search.png`.

Held-out tokens are the tail of the calibration text (`data.holdout.split_holdout`): neither
importance nor the short distillations see them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from minitron_jax.config import PRESETS
from minitron_jax.io import files
from minitron_jax.io import hf as hf_io
from minitron_jax.data.calib import CalibSpec
from minitron_jax.progress import Progress
from minitron_jax.prune import importance as I
from minitron_jax.prune import layer_importance as LI
from minitron_jax.prune import search as S
from minitron_jax.prune import run as prune_run
from minitron_jax.prune import slicing
from minitron_jax.prune.run import check_scoring
from minitron_jax.settings import SettingError, check_non_negative, check_positive


@dataclasses.dataclass(frozen=True)
class SearchJob:
  """One architecture search: the budget, the search's own settings, and the importance and
  calibration settings it shares with `prune.run.PruneJob` (`prune.run.check_scoring`)."""

  model_dir: str
  output_dir: str
  budget: S.Budget
  max_candidates: int = 12      # one-shot scored (closest to the budget first)
  top_k: int = 3                # distilled briefly and re-ranked
  search_steps: int = 8         # distillation updates per top candidate (0 = one-shot only)
  search_batch_size: int = 8
  search_lr: float = 5e-4
  teacher_topk: int = 64        # K of the teacher cache the short distillations share (0 = each
                                # runs the live teacher, its whole distribution)
  score_task: str = ""          # zero-shot task ranking the one-shot candidates ("" = the loss)
  task_limit: int = 100         # examples of `score_task`
  data_root: str | None = None  # where `score_task`'s data is (else the default folders, hub)
  importance: str = "activation"
  aggregation: str = "l2,mean"
  calib: CalibSpec = prune_run.IMPORTANCE_CALIB
  eval_samples: int = 32        # held-out windows every candidate is scored on
  scores_npz: str | None = None  # importance.npz (with layer_scores) from an earlier search
  dry_run: bool = False
  overwrite: bool = False
  dtype: str = "float32"

  def validate(self) -> None:
    """Every setting on its own, before any file is read; raises SettingError."""
    check_scoring(self)
    self.budget.validate()
    check_positive(self, "max_candidates", "top_k", "eval_samples", "search_batch_size")
    check_non_negative(self, "search_steps", "teacher_topk")
    if not self.search_lr > 0:
      raise SettingError("search_lr", f"{{name}}={self.search_lr} must be positive")
    if self.score_task:
      from minitron_jax.evaluate import tasks

      if self.score_task not in tasks.TASKS:
        raise SettingError("score_task", f"{{name}}={self.score_task!r} is not one of "
                           f"{sorted(tasks.TASKS)}")
      check_positive(self, "task_limit")


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def prepare(job: SearchJob):
  """Everything checkable before loading weights; returns (source dir, config, candidates)."""
  from minitron_jax.io import registry

  job.validate()
  if not job.dry_run:
    files.check_output_dir(job.output_dir, job.overwrite)
  if job.dry_run and job.model_dir in PRESETS:  # a full-size space without its weights
    src, cfg = job.model_dir, PRESETS[job.model_dir].replace(dtype=job.dtype)
  else:
    src = str(registry.resolve_model_dir(job.model_dir))
    cfg = hf_io.load_config(src, dtype=job.dtype)
  return src, cfg, S.enumerate_candidates(cfg, job.budget)


def dry_run(cfg, candidates, job: SearchJob) -> str:
  """The candidate table a user sees before spending compute (config only, no weights)."""
  short = S.shortlist(candidates, cfg, job.max_candidates)
  b = job.budget
  head = (f"{len(candidates)} candidates meet the budget (target_params={b.target_params}, "
          f"target_memory_gb={b.target_memory_gb}, kv_tokens={b.kv_tokens}, dtype={b.dtype}); "
          f"the {len(short)} to score:")
  return head + "\n" + S.table(cfg, short, b)


def load_scores(path: str) -> tuple[I.Scores, np.ndarray]:
  """(width scores, per-layer scores) saved by a search (`importance.npz`)."""
  scores, layer_scores, _ = prune_run.load_scores(path)
  if scores is None or layer_scores is None:
    raise SettingError("scores_npz", f"{{name}}={path}: needs unit and layer scores (write it "
                       "with a search, or prune to a width and num_hidden_layers target)")
  return scores, layer_scores


def compute_importance(job: SearchJob, params, cfg, batches) -> tuple[I.Scores, np.ndarray]:
  """Width scores and per-layer importance (1 - cos between a layer's input and output), once."""
  agg = I.Aggregation.parse(job.aggregation)
  n = sum(len(b) for b in batches)
  scores = I.compute_scores(job.importance, params, cfg, batches, agg, seed=job.calib.seed,
                            progress=Progress(f"{job.importance} importance", n))
  layer_scores = LI.block_importance(params, cfg, batches, block_sizes=(1,))[1]
  return scores, np.asarray(layer_scores, np.float64)


def score_oneshot(params, cfg, candidates, scores, layer_scores, held_out, batch_size
                  ) -> list[float]:
  """One-shot held-out loss of every candidate, from the same importance."""
  progress = Progress("one-shot scoring", len(candidates))
  out = []
  for i, c in enumerate(candidates):
    out.append(S.oneshot_loss(params, cfg, c, scores, layer_scores, held_out, batch_size))
    progress(i + 1)
  return out


def task_oneshot(params, cfg, candidates, scores, layer_scores, tok, job: SearchJob
                 ) -> list[dict]:
  """Zero-shot accuracy (acc_norm where the task has it) of every one-shot pruned candidate."""
  from minitron_jax.evaluate import scoring

  progress = Progress(f"one-shot {job.score_task}", len(candidates))
  out = []
  for i, c in enumerate(candidates):
    pruned, ccfg = slicing.prune(params, cfg, S.plan_for(cfg, c, scores, layer_scores))
    r = scoring.evaluate_task(pruned, ccfg, tok, job.score_task, job.data_root,
                              limit=job.task_limit, batch_size=job.calib.batch_size,
                              max_len=job.calib.seq_len, progress=False)
    key = "acc_norm" if "acc_norm" in r else "acc"
    out.append({"task": job.score_task, "metric": key, "acc": r[key],
                "stderr": r[f"{key}_stderr"], "examples": r["examples"]})
    progress(i + 1)
  return out


def short_config(job: SearchJob):
  """The settings of every candidate's short distillation (and of the shared teacher cache)."""
  from minitron_jax.distill.step import TrainConfig

  return TrainConfig(mode="distill", steps=job.search_steps,
                     global_batch_size=job.search_batch_size, seq_len=job.calib.seq_len,
                     lr=job.search_lr, min_lr=job.search_lr / 10,
                     warmup_steps=min(3, job.search_steps - 1), dtype="float32",
                     seed=job.calib.seed, save_every=0, keep_checkpoints=1,
                     async_checkpointing=False, log_every=max(1, job.search_steps))


def short_distill(job: SearchJob, teacher, cfg, c: S.Candidate, scores, layer_scores,
                  train_stream, held_out, pad_id: int, teacher_cache: str | None = None
                  ) -> float:
  """Held-out loss of `c` after `search_steps` distillation updates: from the teacher's cached
  top-K logits (`teacher_cache`), else from the live teacher."""
  from minitron_jax.distill import losses as distill
  from minitron_jax import sharding
  from minitron_jax.distill import run as trainer

  pruned, new_cfg = slicing.prune(teacher, cfg, S.plan_for(cfg, c, scores, layer_scores))
  work = tempfile.mkdtemp(prefix="search_distill_")
  try:
    result = trainer.fit(short_config(job), model_params=pruned,
                         model_cfg=new_cfg.replace(dtype="float32"), train_tokens=train_stream,
                         output_dir=work, teacher_params=None if teacher_cache else teacher,
                         teacher_cfg=cfg.replace(dtype="float32"),
                         dcfg=distill.DistillConfig(), pad_id=pad_id, log=_log,
                         teacher_cache=teacher_cache)
    trained = sharding.host_params(result.params)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return S.mean_loss(trained, new_cfg, held_out, job.calib.batch_size)


def run(job: SearchJob) -> dict[str, Any]:
  """Runs the search; returns the report (also `search_report.json` in the output)."""
  t0 = time.perf_counter()
  src, cfg, candidates = prepare(job)
  if job.dry_run:
    print(dry_run(cfg, candidates, job))
    return {"candidates": len(candidates)}
  short = S.shortlist(candidates, cfg, job.max_candidates)
  _log(dry_run(cfg, candidates, job))
  params, cfg, tok, _ = hf_io.load_model(src, job.dtype)
  train_stream, held_out = _split_tokens(job, tok)
  if job.scores_npz:
    scores, layer_scores = load_scores(job.scores_npz)
  else:
    batches = job.calib.batches(job.calib.windows(train_stream))
    scores, layer_scores = compute_importance(job, params, cfg, batches)
  teacher_loss = S.mean_loss(params, cfg, held_out, job.calib.batch_size)
  oneshot = score_oneshot(params, cfg, short, scores, layer_scores, held_out,
                          job.calib.batch_size)
  accs = (task_oneshot(params, cfg, short, scores, layer_scores, tok, job) if job.score_task
          else None)
  for i, (c, loss) in enumerate(zip(short, oneshot)):
    task = f", {job.score_task} {100 * accs[i]['acc']:.1f} %" if accs else ""
    _log(f"one-shot {c.label()}: held-out perplexity {math.exp(loss):.1f}{task}")
  # Best first: by the task's accuracy when one is given (ties by loss), else by loss.
  keys = [(-accs[i]["acc"] if accs else 0.0, oneshot[i]) for i in range(len(short))]
  order = sorted(range(len(short)), key=lambda i: keys[i])
  top = order[:job.top_k]
  after, cache_info = {}, None
  if job.search_steps:
    after, cache_info = short_distillations(job, params, cfg, [short[i] for i in top],
                                            scores, layer_scores, train_stream, held_out, tok)
    after = dict(zip(top, after))
  final = after if after else {i: oneshot[i] for i in top}
  winner = min(final, key=lambda i: (final[i], i))
  rows = candidate_rows(job, cfg, short, order, top, oneshot, accs, after, winner)
  plan = S.plan_for(cfg, short[winner], scores, layer_scores)
  pruned, new_cfg = slicing.prune(params, cfg, plan)
  report: dict[str, Any] = {
      "model_dir": src, "output_dir": os.path.abspath(job.output_dir),
      "budget": dataclasses.asdict(job.budget), "candidates_in_budget": len(candidates),
      "scored": len(short), "top_k": len(top), "search_steps": job.search_steps,
      "search_tokens_per_candidate": job.search_steps * job.search_batch_size
                                     * job.calib.seq_len,
      "ranked_by": f"{job.score_task} accuracy (one-shot), then held-out loss" if accs else
                   "held-out loss",
      "teacher_cache": cache_info,
      "held_out": {"windows": len(held_out), "seq_len": job.calib.seq_len},
      "teacher_loss": teacher_loss, "winner": short[winner].to_json(), "candidates": rows}
  prune_report = {"model_dir": src, "output_dir": report["output_dir"],
                  "importance": job.importance, "aggregation": job.aggregation,
                  "search": "search_report.json", **slicing.plan_summary(cfg, plan)}

  def extra_files(d):
    arrays = scores.to_npz_dict()
    arrays.update(layer_scores=np.asarray(layer_scores), drop_block=np.array(False))
    np.savez(os.path.join(d, "importance.npz"), **arrays)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    files.write_json(os.path.join(d, "search_report.json"), report)
    files.write_json(os.path.join(d, "prune_report.json"), prune_report)
    plot(os.path.join(d, "search.png"), rows, teacher_loss)

  hf_io.save_hf(pruned, new_cfg, job.output_dir, source_dir=src, overwrite=job.overwrite,
                extra_files=extra_files)
  return report


def _split_tokens(job: SearchJob, tok):
  """(training token stream, held-out windows): the held-out windows are the calibration
  text's tail, which neither importance nor the short distillations read."""
  from minitron_jax.data import corpus as data, packing
  from minitron_jax.data.holdout import split_holdout

  stream = data.load_tokens(job.calib.data, tok)
  train_stream, tail = split_holdout(stream, job.eval_samples * job.calib.seq_len)
  held_out = packing.eval_windows(tail, job.calib.seq_len)[:job.eval_samples]
  return train_stream, held_out


def short_distillations(job: SearchJob, params, cfg, top: list[S.Candidate], scores,
                        layer_scores, train_stream, held_out, tok
                        ) -> tuple[list[float], dict | None]:
  """Held-out loss of each of `top` after its short distillation, and the teacher cache's
  summary (None without one). The cache is one teacher pass for every candidate's batches
  (the same batches each), removed afterwards."""
  pad_id = int((tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id) or 0)
  cache_dir = tempfile.mkdtemp(prefix="search_teacher_") if job.teacher_topk else None
  cache_info, losses = None, []
  try:
    if cache_dir:
      from minitron_jax.distill import teacher_cache as tc

      cache_info = tc.write_for_run(cache_dir, short_config(job), params,
                                    cfg.replace(dtype="float32"), train_stream,
                                    job.teacher_topk, pad_id=pad_id, log=_log)
      cache_info.pop("teacher_cache")
    for n, c in enumerate(top):
      _log(f"short distillation {n + 1}/{len(top)}: {c.label()}")
      losses.append(short_distill(job, params, cfg, c, scores, layer_scores, train_stream,
                                  held_out, pad_id, teacher_cache=cache_dir))
      _log(f"after {job.search_steps} steps: held-out perplexity {math.exp(losses[-1]):.1f}")
  finally:
    if cache_dir:
      shutil.rmtree(cache_dir, ignore_errors=True)
  return losses, cache_info


def candidate_rows(job: SearchJob, cfg, short, order, top, oneshot, accs, after, winner
                   ) -> list[dict]:
  """One row of the report per scored candidate: shape, size, one-shot and distilled scores
  and ranks (`order`: one-shot rank order; `top`: the distilled ones, in that order)."""
  final = after if after else {i: oneshot[i] for i in top}
  changes = S.rank_changes(range(len(top)), [final[i] for i in top])
  rows = []
  for i, c in enumerate(short):
    row = {"rank_oneshot": order.index(i) + 1, **c.to_json(),
           "params": S.param_count(cfg, c),
           "memory_bytes": S.memory_bytes(cfg, c, job.budget.kv_tokens, job.budget.dtype),
           "oneshot_loss": oneshot[i], "oneshot_ppl": math.exp(oneshot[i])}
    if accs:
      row["oneshot_task"] = accs[i]
    if i in after:
      row.update(distilled_loss=after[i], distilled_ppl=math.exp(after[i]),
                 rank_distilled=sorted(after, key=lambda j: (after[j], j)).index(i) + 1,
                 rank_change=changes[top.index(i)])
    row["winner"] = i == winner
    rows.append(row)
  return rows


def plot(path: str, rows: list[dict], teacher_loss: float) -> None:
  """Held-out perplexity against parameters: one-shot, after the short distillation, winner."""
  from minitron_jax import plots

  plt = plots.pyplot()

  fig, ax = plt.subplots(figsize=(7, 4.5))
  p = np.array([r["params"] for r in rows]) / 1e6
  ax.scatter(p, [r["oneshot_ppl"] for r in rows], marker="o", facecolors="none",
             edgecolors="tab:blue", label="one-shot")
  done = [r for r in rows if "distilled_ppl" in r]
  for r in done:
    ax.annotate("", (r["params"] / 1e6, r["distilled_ppl"]), (r["params"] / 1e6, r["oneshot_ppl"]),
                arrowprops=dict(arrowstyle="->", color="0.6"))
  if done:
    ax.scatter([r["params"] / 1e6 for r in done], [r["distilled_ppl"] for r in done],
               color="tab:orange", label="after short distillation")
  w = next(r for r in rows if r["winner"])
  ax.scatter([w["params"] / 1e6], [w.get("distilled_ppl", w["oneshot_ppl"])], marker="*", s=250,
             color="tab:red", label=f"winner d{w['hidden_size']} f{w['intermediate_size']} "
             f"n{w['num_attention_heads']} l{w['num_hidden_layers']}")
  ax.axhline(math.exp(teacher_loss), color="0.3", ls="--", lw=1, label="teacher")
  ax.set_yscale("log")
  ax.set_xlabel("parameters (M)")
  ax.set_ylabel("held-out perplexity")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
