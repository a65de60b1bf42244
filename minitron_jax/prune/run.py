"""One pruning run: calibration data -> importance -> plan -> pruned HF directory + report."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any

import numpy as np

from minitron_jax import sharding
from minitron_jax.config import LlamaConfig
from minitron_jax.data.calib import CalibSpec
from minitron_jax.progress import Progress
from minitron_jax.io import files
from minitron_jax.io import hf as hf_io
from minitron_jax.io import hf_compat
from minitron_jax.prune import importance as I
from minitron_jax.prune import layer_importance as LI
from minitron_jax.prune import slicing
from minitron_jax.settings import MeshSpec, SettingError, check_non_negative, check_positive


# The calibration windows importance is computed on, by a prune and by a search.
IMPORTANCE_CALIB = CalibSpec(samples=1024, seq_len=512)


@dataclasses.dataclass(frozen=True)
class PruneJob:
  """One pruning run: its settings and their defaults (the launch script's and the library's).

  Attributes:
    model_dir: HF directory, known short name or hub id.
    output_dir: the pruned HF directory to write.
    hidden_size, intermediate_size, num_attention_heads, num_key_value_heads,
      num_hidden_layers: target shape (None keeps the source's).
    drop_layers: explicit layers to drop, e.g. "16-31" (exclusive with num_hidden_layers).
    importance: width importance criterion (`importance.METHODS`).
    aggregation: activation aggregation over batch,sequence (`importance.Aggregation`).
    layer_importance: depth criterion (`layer_importance.METRICS`).
    calib: calibration windows (its seed also seeds random importance).
    eval_samples: held-out windows for the perplexity before/after in the report.
    layer_task, layer_task_limit: the zero-shot task of `layer_importance="accuracy"`.
    layer_batches: calibration batches per layer-removal trial (lm_loss metric).
    data_root: task data folder (None: the default folders, then the hub).
    scores_npz: reuse saved scores: stream the checkpoint, no model in memory.
    overwrite: replace a non-empty output directory.
    dtype: compute dtype.
    mesh: shards params and calibration rows ("" = one device).
  """

  model_dir: str
  output_dir: str
  hidden_size: int | None = None
  intermediate_size: int | None = None
  num_attention_heads: int | None = None
  num_key_value_heads: int | None = None
  num_hidden_layers: int | None = None
  drop_layers: str | None = None
  importance: str = "activation"
  aggregation: str = "l2,mean"
  layer_importance: str = "block_importance"
  calib: CalibSpec = IMPORTANCE_CALIB
  eval_samples: int = 32
  layer_task: str = "winogrande"
  layer_task_limit: int = 200
  layer_batches: int = 4
  data_root: str | None = None
  scores_npz: str | None = None
  overwrite: bool = False
  dtype: str = "float32"
  mesh: MeshSpec = MeshSpec()

  def targets(self) -> dict[str, Any]:
    return {k: getattr(self, k) for k in TARGETS}

  def validate(self) -> None:
    """Every setting on its own, before any file is read; raises SettingError."""
    check_scoring(self)
    if self.layer_importance not in LI.METRICS:
      raise SettingError("layer_importance",
                         f"{{name}}={self.layer_importance!r} is not one of {LI.METRICS}")
    check_positive(self, "layer_task_limit", "layer_batches")
    check_non_negative(self, "eval_samples")


TARGETS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
           "num_hidden_layers")


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


DTYPES = ("float32", "bfloat16")


def check_scoring(job) -> None:
  """The settings every importance-scoring job shares (`PruneJob`, the search's job):
  calibration data, criterion, aggregation, dtype, reused scores, mesh."""
  job.calib.validate()
  if job.importance not in I.METHODS:
    raise SettingError("importance", f"{{name}}={job.importance!r} is not one of {I.METHODS}")
  I.Aggregation.parse(job.aggregation)
  if job.dtype not in DTYPES:
    raise SettingError("dtype", f"{{name}}={job.dtype!r} is not one of {DTYPES}")
  if job.scores_npz and not os.path.isfile(job.scores_npz):
    raise SettingError("scores_npz", f"{{name}}={job.scores_npz}: no such file")
  mesh = getattr(job, "mesh", None)
  if mesh is not None:
    mesh.validate()


def load_scores(path: str) -> tuple[I.Scores | None, np.ndarray | None, bool]:
  """(unit scores or None, per-layer scores or None, whether the layers drop as one block)
  saved as `importance.npz` by a prune or a search."""
  with np.load(path, allow_pickle=False) as z:
    scores = (I.Scores(heads=z["heads"], neurons=z["neurons"], channels=z["channels"],
                       kv_groups=z["kv_groups"]) if "heads" in z else None)
    layer_scores = np.asarray(z["layer_scores"]) if "layer_scores" in z else None
    drop_block = bool(z["drop_block"]) if "drop_block" in z else False
  return scores, layer_scores, drop_block


def prepare(job: PruneJob):
  """Everything checkable before any work: settings, output directory, source config and
  targets; returns (source dir, config, targets, target config, aggregation)."""
  from minitron_jax.io import registry

  job.validate()
  agg = I.Aggregation.parse(job.aggregation)
  files.check_output_dir(job.output_dir, job.overwrite)
  src = str(registry.resolve_model_dir(job.model_dir))
  cfg = hf_io.load_config(src, dtype=job.dtype)
  targets = slicing.Targets.from_flags(cfg, drop_layers=job.drop_layers, **job.targets())
  new = targets.validate(cfg)
  if new == cfg:
    raise SettingError("hidden_size", "no pruning target given (e.g. {name}, drop_layers)")
  return src, cfg, targets, new, agg


def nearby_valid_shapes(src: LlamaConfig, new: LlamaConfig) -> tuple[list[int], list[int]]:
  """Shapes next to a refused `new` (`compat_warnings`) whose head count divides the hidden size.

  Hidden sizes: the multiples of `new.num_attention_heads` just below and above
  `new.hidden_size`, no larger than the source's. Head counts: those pruning can reach (the same
  number per KV group, at most the source's per group) that divide `new.hidden_size`, the
  nearest below and above `new.num_attention_heads`.
  """
  n, d, k = new.num_attention_heads, new.hidden_size, new.num_key_value_heads
  below = d // n * n
  hidden = [h for h in (below, below + n) if 0 < h <= src.hidden_size and h != d]
  reachable = [k * g for g in range(1, src.num_groups + 1) if d % (k * g) == 0]
  heads = [max((h for h in reachable if h < n), default=None),
           min((h for h in reachable if h > n), default=None)]
  return hidden, [h for h in heads if h is not None]


def compat_warnings(src: LlamaConfig, new: LlamaConfig) -> list[str]:
  """Why stock tools will refuse the pruned config, with the fix; empty when none will.

  The one refusal: transformers 5.x's Llama config check wants `hidden_size` to be a multiple
  of `num_attention_heads` even with an explicit `head_dim` (huggingface/transformers#46211),
  and vLLM (>= 0.24 requires transformers 5) parses config.json through it. vLLM's tensor
  parallelism needs head counts divisible by its size, but that is a serving choice.
  """
  if not hf_compat.refused_by_transformers5(new.to_hf()):
    return []
  hidden, heads = nearby_valid_shapes(src, new)
  options = [f"--hidden_size={' or '.join(map(str, hidden))}"] if hidden else []
  options += [f"--num_attention_heads={' or '.join(map(str, heads))}"] if heads else []
  alternative = f", or prune to {', or '.join(options)}" if options else ""
  return [f"hidden_size={new.hidden_size} is not a multiple of num_attention_heads="
          f"{new.num_attention_heads} (head_dim={new.head_dim} is explicit): our tools load it, "
          "but transformers 5.x and vLLM refuse the config. Fix: call "
          "minitron_jax.io.hf_compat.allow_explicit_head_dim() before from_pretrained"
          f"{alternative}."]


def _layer_scores(job, params, cfg, new, tok, batches, data_root, out: dict, mesh=None):
  """Layer importance for a `num_hidden_layers` target: per-layer scores, or the damage of
  each contiguous block of the dropped size (lm_loss / accuracy)."""
  n_drop = cfg.num_hidden_layers - new.num_hidden_layers
  if job.layer_importance == "block_importance":
    bi = LI.block_importance(params, cfg, batches, block_sizes=sorted({1, n_drop}), mesh=mesh)
    out["curves"]["block importance (1 - cos)"] = (None, bi)
    out["layer_scores"] = {f"block_importance_k{k}": v for k, v in bi.items()}
    return bi[1], False
  # A trial per block of the dropped size decides; the per-layer picture for the plot comes
  # from one forward pass (block importance) rather than a trial per single layer.
  sizes = [n_drop]
  bi = LI.block_importance(params, cfg, batches[:job.layer_batches], block_sizes=[1], mesh=mesh)
  out["curves"]["block importance (1 - cos)"] = (None, bi)
  out["layer_scores"]["block_importance_k1"] = bi[1]
  if job.layer_importance == "lm_loss":
    base, loss = LI.lm_loss_drop(params, cfg, batches[:job.layer_batches], block_sizes=sizes,
                                 progress=Progress("layer loss", sum(
                                     cfg.num_hidden_layers - k + 1 for k in sizes)), mesh=mesh)
    out["curves"]["LM loss"] = (base, loss)
    out["layer_scores"].update({f"lm_loss_k{k}": v for k, v in loss.items()})
    return loss[n_drop], True
  base, acc = LI.accuracy_drop(params, cfg, tok, job.layer_task, data_root, block_sizes=sizes,
                               limit=job.layer_task_limit, mesh=mesh,
                               progress=Progress("layer accuracy", sum(
                                   cfg.num_hidden_layers - k + 1 for k in sizes)))
  out["curves"][f"{job.layer_task} accuracy"] = (base, acc)
  out["layer_scores"].update({f"accuracy_k{k}": v for k, v in acc.items()})
  return -acc[n_drop], True  # lower damage = higher accuracy


def _ppl(params, cfg, windows, batch_size, mesh=None) -> float:
  loss = I.jitted_lm_loss(cfg, mesh=mesh)  # compiled once per config, not per call
  if mesh is not None:
    params = sharding.shard_params(params, cfg, mesh)
  chunks = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
  if mesh is None:
    vals = [float(loss(params, c)) for c in chunks]
  else:
    vals = [float(loss(params, *I.padded_batch(c, mesh))) for c in chunks]
  return math.exp(float(np.average(vals, weights=[len(c) for c in chunks])))


def run(job: PruneJob) -> dict[str, Any]:
  """Runs the job; returns the report (also written as prune_report.json)."""
  t0 = time.perf_counter()
  src, cfg, targets, new, agg = prepare(job)
  warnings = compat_warnings(cfg, new)
  for w in warnings:
    _log(f"warning: {w}")
  report: dict[str, Any] = {"model_dir": src, "output_dir": os.path.abspath(job.output_dir),
                            "importance": job.importance, "aggregation": job.aggregation,
                            "warnings": warnings}
  if job.scores_npz:
    return _run_streamed(job, src, cfg, targets, new, report)
  params, cfg, tok, _ = hf_io.load_model(src, job.dtype)
  mesh = job.mesh.stage_mesh()
  # Scoring reads `placed` (sharded over the mesh); slicing and saving read the host copy.
  placed = params if mesh is None else sharding.shard_params(params, cfg, mesh)
  calib, held_out = _calibration_windows(job, tok, report)
  batches = job.calib.batches(calib)
  scores = None
  if slicing.cuts_width(cfg, new):  # a depth-only target ranks layers: no unit scores to compute
    ts = time.perf_counter()
    scores = I.compute_scores(job.importance, placed, cfg, batches, agg, seed=job.calib.seed,
                              progress=Progress(f"{job.importance} importance", len(calib)),
                              mesh=mesh)
    report["importance_seconds"] = round(time.perf_counter() - ts, 2)
  extra: dict[str, Any] = {"curves": {}, "layer_scores": {}}
  layer_scores, drop_block = _depth_scores(job, placed, cfg, new, targets, tok, batches, extra,
                                           mesh)
  plan = slicing.make_plan(cfg, targets, scores, layer_scores, drop_block)
  pruned, new_cfg = slicing.prune(params, cfg, plan)
  report.update(slicing.plan_summary(cfg, plan))
  if len(held_out):
    report["calibration_ppl_before"] = _ppl(placed, cfg, held_out, job.calib.batch_size, mesh)
    report["calibration_ppl_after"] = _ppl(pruned, new_cfg, held_out, job.calib.batch_size,
                                           mesh)
  report["layer_importance"] = {k: np.asarray(v).tolist()
                                for k, v in extra["layer_scores"].items()}
  report["seconds"] = round(time.perf_counter() - t0, 2)
  hf_io.save_hf(pruned, new_cfg, job.output_dir, source_dir=src, overwrite=job.overwrite,
                extra_files=lambda d: _write_outputs(d, src, report, scores, layer_scores,
                                                     drop_block, extra))
  return report


def _run_streamed(job: PruneJob, src: str, cfg, targets, new, report: dict) -> dict:
  """Plans from saved scores and slices the checkpoint on disk (no model in memory)."""
  scores, layer_scores, drop_block = load_scores(job.scores_npz)
  if scores is None and slicing.cuts_width(cfg, new):
    raise SettingError("scores_npz", f"{{name}}={job.scores_npz} holds layer scores only (it "
                       "came from a depth-only prune); a width target needs a width prune's "
                       "importance.npz")
  plan = slicing.make_plan(cfg, targets, scores, layer_scores, drop_block=drop_block)
  report.update(slicing.plan_summary(cfg, plan), streamed=True)
  slicing.prune_checkpoint(src, job.output_dir, plan, overwrite=job.overwrite,
                     extra_files=lambda d: files.write_json(
                         os.path.join(d, "prune_report.json"), report))
  return report


def _calibration_windows(job: PruneJob, tok, report: dict) -> tuple[np.ndarray, np.ndarray]:
  """(calibration windows, held-out windows) of `job.calib`; notes them in `report`."""
  from minitron_jax.data import corpus

  _log(f"calibration data: {job.calib.data}")
  windows = job.calib.windows(corpus.load_tokens(job.calib.data, tok), extra=job.eval_samples)
  calib, held_out = windows[:job.calib.samples], windows[job.calib.samples:]
  report["calibration"] = {"source": job.calib.data, "samples": len(calib),
                           "seq_len": job.calib.seq_len, "held_out_samples": len(held_out)}
  return calib, held_out


def _depth_scores(job: PruneJob, placed, cfg, new, targets, tok, batches, extra: dict, mesh):
  """(layer scores or None, whether they drop one block) for a depth target; an explicit
  `drop_layers` list still measures block importance for the report and the plot."""
  from minitron_jax.evaluate import tasks

  if targets.drop_layers is not None:
    extra["curves"]["block importance (1 - cos)"] = (None, LI.block_importance(
        placed, cfg, batches[:4], block_sizes=sorted({1, len(targets.drop_layers)}),
        mesh=mesh))
    return None, False
  if new.num_hidden_layers == cfg.num_hidden_layers:
    return None, False
  root = job.data_root or tasks.default_data_root()
  return _layer_scores(job, placed, cfg, new, tok, batches, root, extra, mesh)


def _write_outputs(d: str, src: str, report: dict, scores, layer_scores, drop_block: bool,
                   extra: dict) -> None:
  """importance.npz, the plots and prune_report.json, into the pruned directory `d`."""
  arrays = scores.to_npz_dict() if scores is not None else {}
  if layer_scores is not None:
    arrays.update(layer_scores=np.asarray(layer_scores), drop_block=np.array(drop_block))
  arrays.update({f"layer_{k}": np.asarray(v) for k, v in extra["layer_scores"].items()})
  np.savez(os.path.join(d, "importance.npz"), **arrays)
  if extra["curves"]:
    LI.plot(os.path.join(d, "layer_importance.png"), extra["curves"],
            title=f"layer importance of {os.path.basename(src)}")
  if scores is not None:
    plot_unit_scores(os.path.join(d, "importance.png"), scores)
  files.write_json(os.path.join(d, "prune_report.json"), report)


def plot_unit_scores(path: str, scores: I.Scores) -> None:
  """Heatmaps of head and neuron importance per layer, and the channel importance curve."""
  from minitron_jax import plots

  plt = plots.pyplot()

  fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
  for ax, m, name in ((a, scores.heads, "attention heads"), (b, scores.neurons, "MLP neurons")):
    m = np.asarray(m, np.float64)
    # A few outlier neurons dominate a linear scale; log10 shows the ranking that matters.
    im = ax.imshow(np.log10(m - m.min() + 1e-6 * (np.ptp(m) + 1e-12)).T, aspect="auto",
                   origin="lower", cmap="viridis")
    ax.set_title(f"log10 importance: {name}", fontsize=9)
    ax.set_xlabel("layer")
    ax.set_ylabel(name)
    fig.colorbar(im, ax=ax)
  c.plot(np.sort(np.asarray(scores.channels))[::-1])
  c.set_xlabel("embedding channels, by rank")
  c.set_ylabel("importance")
  c.set_yscale("log")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
