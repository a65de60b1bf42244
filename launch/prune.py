"""Prune an HF Llama checkpoint by width and/or depth with importance from calibration data.

  python launch/prune.py --model_dir=smollm2-135m --output_dir=pruned --hidden_size=432 \
      --intermediate_size=896 --importance=activation --calib_data=shakespeare
  python launch/prune.py --model_dir=DIR --output_dir=OUT --drop_layers=16-31

With a budget instead of a shape, the architecture search picks the shape (prune/search.py):

  python launch/prune.py --model_dir=llama3.1-8b --output_dir=- --target_params=4.5e9 --dry_run
  python launch/prune.py --model_dir=smollm2-135m --output_dir=searched --target_params=8.1e7 \
      --width_multiple=16 --calib_data=wikitext2 --search_top_k=3 --search_steps=8
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from minitron_jax import cli, settings, sharding  # noqa: E402
from minitron_jax.data.calib import CalibSpec  # noqa: E402
from minitron_jax.prune import run as prune_job  # noqa: E402
from minitron_jax.prune import search as search_space  # noqa: E402
from minitron_jax.prune.importance import METHODS  # noqa: E402
from minitron_jax.prune.layer_importance import METRICS  # noqa: E402
from minitron_jax.recipe import search as search_run  # noqa: E402

# Defaults come from the jobs (PruneJob and SearchJob share theirs for the common settings).
PRUNE, SEARCH = prune_job.PruneJob, search_run.SearchJob
CAL, BUDGET = PRUNE.calib, search_space.Budget

_MODEL = flags.DEFINE_string("model_dir", "smollm2-135m", "Source model (dir, short name, hub id).")
_OUT = flags.DEFINE_string("output_dir", None, "Pruned HF directory to write.", required=True)
_HIDDEN = flags.DEFINE_integer("hidden_size", None, "Target hidden size.")
_MLP = flags.DEFINE_integer("intermediate_size", None, "Target MLP width.")
_HEADS = flags.DEFINE_integer("num_attention_heads", None, "Target query heads.")
_KV = flags.DEFINE_integer("num_key_value_heads", None, "Target KV heads (whole groups).")
_LAYERS = flags.DEFINE_integer("num_hidden_layers", None,
                               "Target depth; the least important layers go (see "
                               "--layer_importance).")
_DROP = flags.DEFINE_string("drop_layers", None, "Explicit layers to drop, e.g. 16-31 or 1,3,5.")
_IMP = flags.DEFINE_enum("importance", PRUNE.importance, METHODS, "Width importance criterion.")
_AGG = flags.DEFINE_string("aggregation", PRUNE.aggregation,
                           "Activation aggregation over batch,sequence: mean|l2|var each.")
_LIMP = flags.DEFINE_enum("layer_importance", PRUNE.layer_importance, METRICS,
                          "Depth criterion: block_importance drops the least important single "
                          "layers; lm_loss / accuracy drop the least damaging contiguous block.")
_CALIB = flags.DEFINE_string("calib_data", CAL.data,
                             "Calibration text: file, directory, glob, jsonl, hub name, or "
                             "'shakespeare' (embedded, offline).")
_NCAL = flags.DEFINE_integer("calib_samples", CAL.samples, "Calibration sequences.")
_LCAL = flags.DEFINE_integer("calib_seq_len", CAL.seq_len, "Tokens per calibration sequence.")
_NEVAL = flags.DEFINE_integer("eval_samples", PRUNE.eval_samples, "Held-out sequences for the "
                              "perplexity before/after in the report (search: the held-out "
                              "windows every candidate is scored on, at least 1).")
_BATCH = flags.DEFINE_integer("batch_size", CAL.batch_size, "Sequences per forward.")
_SEED = flags.DEFINE_integer("seed", CAL.seed, "Calibration sampling (and random importance) "
                             "seed.")
_TASK = flags.DEFINE_string("layer_task", PRUNE.layer_task,
                            "Task for --layer_importance=accuracy.")
_TASK_LIMIT = flags.DEFINE_integer("layer_task_limit", PRUNE.layer_task_limit,
                                   "Examples for the accuracy metric.")
_LBATCH = flags.DEFINE_integer("layer_batches", PRUNE.layer_batches, "Calibration batches per "
                               "layer-removal trial (--layer_importance=lm_loss).")
_DATA = flags.DEFINE_string("data_root", PRUNE.data_root,
                            "Task data folder (default ../shared/data).")
_SCORES = flags.DEFINE_string("scores_npz", PRUNE.scores_npz, "Reuse importance.npz from an "
                              "earlier run and stream the checkpoint tensor by tensor (no model "
                              "in memory).")
_OVERWRITE = flags.DEFINE_bool("overwrite", PRUNE.overwrite, "Replace a non-empty --output_dir.")
_DTYPE = flags.DEFINE_enum("dtype", PRUNE.dtype, list(prune_job.DTYPES), "Compute dtype.")
_MESH = flags.DEFINE_string("mesh", PRUNE.mesh.spec, "Device mesh to shard params and batch "
                            "rows over, e.g. fsdp:-1 or data:2,fsdp:2,tensor:2 (as "
                            "launch/distill.py); empty: one device.")

# Architecture search: a budget instead of a shape.
_TPARAMS = flags.DEFINE_float("target_params", BUDGET.target_params, "Search: total parameter "
                              "budget (a tied embedding counted once); candidates lie in "
                              "[(1 - budget_slack) x target, target].")
_TMEM = flags.DEFINE_float("target_memory_gb", BUDGET.target_memory_gb, "Search: weights at "
                           "--export_dtype plus the KV cache of --kv_tokens tokens must fit in "
                           "this many GB (1e9 B).")
_KV_TOKENS = flags.DEFINE_integer("kv_tokens", BUDGET.kv_tokens, "Search: KV-cache tokens for "
                                  "the memory target.")
_EXPORT_DTYPE = flags.DEFINE_enum("export_dtype", BUDGET.dtype, sorted(search_space.DTYPE_BYTES),
                                  "Search: dtype of the weights and KV cache in the memory "
                                  "target.")
_SLACK = flags.DEFINE_float("budget_slack", BUDGET.slack, "Search: how far below the budget a "
                            "candidate may lie (fraction).")
_WCUT = flags.DEFINE_float("max_width_cut", BUDGET.max_width_cut, "Search: largest cut of "
                           "hidden, MLP or query heads (fraction of the teacher's).")
_DCUT = flags.DEFINE_float("max_depth_cut", BUDGET.max_depth_cut, "Search: largest cut of the "
                           "layers (fraction).")
_MULT = flags.DEFINE_integer("width_multiple", BUDGET.multiple, "Search: hidden and MLP widths "
                             "are multiples of this (0 = 128 for teacher sizes >= 2048 that 128 "
                             "divides, else the largest of 64/32/16/8 dividing the teacher's "
                             "size).")
_NCAND = flags.DEFINE_integer("max_candidates", SEARCH.max_candidates, "Search: candidates "
                              "scored one-shot, closest to the budget first.")
_TOPK = flags.DEFINE_integer("search_top_k", SEARCH.top_k, "Search: best one-shot candidates "
                             "distilled briefly and re-ranked.")
_SSTEPS = flags.DEFINE_integer("search_steps", SEARCH.search_steps, "Search: distillation "
                               "updates per top candidate (0 = rank one-shot only).")
_SBATCH = flags.DEFINE_integer("search_batch_size", SEARCH.search_batch_size,
                               "Search: sequences per update.")
_SLR = flags.DEFINE_float("search_lr", SEARCH.search_lr, "Search: peak learning rate of the "
                          "short distillation.")
_STOPK = flags.DEFINE_integer("search_teacher_topk", SEARCH.teacher_topk, "Search: the short "
                              "distillations read the teacher's top-K logits, written once for "
                              "all of them (0 = each runs the live teacher).")
_STASK = flags.DEFINE_string("search_task", SEARCH.score_task, "Search: rank the one-shot "
                             "candidates by this zero-shot task's accuracy (e.g. arc_easy; "
                             "held-out loss breaks ties); empty: by held-out loss.")
_STASK_LIMIT = flags.DEFINE_integer("search_task_limit", SEARCH.task_limit,
                                    "Search: examples of --search_task.")
_DRY = flags.DEFINE_bool("dry_run", SEARCH.dry_run, "Search: print the candidate table (config "
                         "only, no weights; a preset name such as llama3.1-8b works) and stop.")

# Job field -> flag, where the flag is not `--` and the field's last part.
CALIB_FLAGS = {"calib.data": "--calib_data", "calib.samples": "--calib_samples",
               "calib.seq_len": "--calib_seq_len"}
PRUNE_FLAGS = settings.flag_names(CALIB_FLAGS)
SEARCH_FLAGS = settings.flag_names({
    **CALIB_FLAGS, "top_k": "--search_top_k", "teacher_topk": "--search_teacher_topk",
    "score_task": "--search_task", "task_limit": "--search_task_limit",
    "budget.dtype": "--export_dtype", "budget.slack": "--budget_slack",
    "budget.multiple": "--width_multiple"})


def calib_from_flags() -> CalibSpec:
  return CalibSpec(data=_CALIB.value, samples=_NCAL.value, seq_len=_LCAL.value,
                   batch_size=_BATCH.value, seed=_SEED.value)


def search_job() -> search_run.SearchJob:
  shape = [n for n, f in (("hidden_size", _HIDDEN), ("intermediate_size", _MLP),
                          ("num_attention_heads", _HEADS), ("num_key_value_heads", _KV),
                          ("num_hidden_layers", _LAYERS), ("drop_layers", _DROP))
           if f.value is not None]
  if shape:
    raise ValueError(f"--{shape[0]} and a budget (--target_params / --target_memory_gb) are "
                     "exclusive: the search chooses the shape")
  budget = search_space.Budget(
      target_params=_TPARAMS.value, target_memory_gb=_TMEM.value, kv_tokens=_KV_TOKENS.value,
      dtype=_EXPORT_DTYPE.value, slack=_SLACK.value, max_width_cut=_WCUT.value,
      max_depth_cut=_DCUT.value, multiple=_MULT.value)
  return search_run.SearchJob(
      model_dir=_MODEL.value, output_dir=_OUT.value, budget=budget,
      max_candidates=_NCAND.value, top_k=_TOPK.value, search_steps=_SSTEPS.value,
      search_batch_size=_SBATCH.value, search_lr=_SLR.value, teacher_topk=_STOPK.value,
      score_task=_STASK.value, task_limit=_STASK_LIMIT.value, data_root=_DATA.value,
      importance=_IMP.value, aggregation=_AGG.value, calib=calib_from_flags(),
      eval_samples=max(1, _NEVAL.value), scores_npz=_SCORES.value,
      dry_run=_DRY.value, overwrite=_OVERWRITE.value, dtype=_DTYPE.value)


def search():
  job = search_job()
  with settings.named(SEARCH_FLAGS):
    report = search_run.run(job)
  if not job.dry_run:
    w = report["winner"]
    print(f"search winner: hidden {w['hidden_size']}, MLP {w['intermediate_size']}, heads "
          f"{w['num_attention_heads']}/{w['num_key_value_heads']}, layers "
          f"{w['num_hidden_layers']}; wrote {report['output_dir']}")


def prune_job_from_flags() -> prune_job.PruneJob:
  return prune_job.PruneJob(
      model_dir=_MODEL.value, output_dir=_OUT.value, hidden_size=_HIDDEN.value,
      intermediate_size=_MLP.value, num_attention_heads=_HEADS.value,
      num_key_value_heads=_KV.value, num_hidden_layers=_LAYERS.value, drop_layers=_DROP.value,
      importance=_IMP.value, aggregation=_AGG.value, layer_importance=_LIMP.value,
      calib=calib_from_flags(),
      eval_samples=_NEVAL.value, layer_task=_TASK.value, layer_task_limit=_TASK_LIMIT.value,
      layer_batches=_LBATCH.value, data_root=_DATA.value, scores_npz=_SCORES.value,
      overwrite=_OVERWRITE.value, dtype=_DTYPE.value, mesh=settings.MeshSpec(_MESH.value))


@cli.main_wrapper
def main(argv):
  del argv
  if _TPARAMS.value is not None or _TMEM.value is not None:
    return search()
  if _DRY.value:
    raise ValueError("--dry_run needs a budget (--target_params or --target_memory_gb)")
  sharding.initialize_distributed()
  with settings.named(PRUNE_FLAGS):
    report = prune_job.run(prune_job_from_flags())
  before, after = report["params_before"], report["params_after"]
  print(f"pruned {before / 1e6:.1f}M -> {after / 1e6:.1f}M parameters "
        f"({after / before:.1%}); wrote {report['output_dir']}")
  if "calibration_ppl_before" in report:
    print(f"held-out calibration perplexity: {report['calibration_ppl_before']:.2f} -> "
          f"{report['calibration_ppl_after']:.2f}")


if __name__ == "__main__":
  app.run(main)
