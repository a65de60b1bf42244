"""Prune an HF Llama checkpoint by width and/or depth with importance from calibration data.

  python launch/prune.py --model_dir=smollm2-135m --output_dir=pruned --hidden_size=432 \
      --intermediate_size=896 --importance=activation --calib_data=shakespeare
  python launch/prune.py --model_dir=DIR --output_dir=OUT --drop_layers=16-31
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from minitron_jax import cli, sharding  # noqa: E402
from minitron_jax.prune import run as prune_job  # noqa: E402
from minitron_jax.prune.importance import METHODS  # noqa: E402
from minitron_jax.prune.layer_importance import METRICS  # noqa: E402

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
_IMP = flags.DEFINE_enum("importance", "activation", METHODS, "Width importance criterion.")
_AGG = flags.DEFINE_string("aggregation", "l2,mean",
                           "Activation aggregation over batch,sequence: mean|l2|var each.")
_LIMP = flags.DEFINE_enum("layer_importance", "block_importance", METRICS,
                          "Depth criterion: block_importance drops the least important single "
                          "layers; lm_loss / accuracy drop the least damaging contiguous block.")
_CALIB = flags.DEFINE_string("calib_data", "shakespeare",
                             "Calibration text: file, directory, glob, jsonl, hub name, or "
                             "'shakespeare' (embedded, offline).")
_NCAL = flags.DEFINE_integer("calib_samples", 1024, "Calibration sequences.", lower_bound=1)
_LCAL = flags.DEFINE_integer("calib_seq_len", 512, "Tokens per calibration sequence.",
                             lower_bound=2)
_NEVAL = flags.DEFINE_integer("eval_samples", 32, "Held-out sequences for the perplexity "
                              "before/after in the report.", lower_bound=0)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per forward.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Calibration sampling (and random importance) seed.")
_TASK = flags.DEFINE_string("layer_task", "winogrande", "Task for --layer_importance=accuracy.")
_TASK_LIMIT = flags.DEFINE_integer("layer_task_limit", 200, "Examples for the accuracy metric.",
                                   lower_bound=1)
_LBATCH = flags.DEFINE_integer("layer_batches", 4, "Calibration batches per layer-removal trial "
                               "(--layer_importance=lm_loss).", lower_bound=1)
_DATA = flags.DEFINE_string("data_root", None, "Task data folder (default ../shared/data).")
_SCORES = flags.DEFINE_string("scores_npz", None, "Reuse importance.npz from an earlier run and "
                              "stream the checkpoint tensor by tensor (no model in memory).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output_dir.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_MESH = flags.DEFINE_string("mesh", "", "Device mesh to shard params and batch rows over, e.g. fsdp:-1 or data:2,fsdp:2,tensor:2 (as launch/distill.py); empty: one device.")


@cli.main_wrapper
def main(argv):
  del argv
  sharding.initialize_distributed()
  job = prune_job.PruneJob(
      model_dir=_MODEL.value, output_dir=_OUT.value, hidden_size=_HIDDEN.value,
      intermediate_size=_MLP.value, num_attention_heads=_HEADS.value,
      num_key_value_heads=_KV.value, num_hidden_layers=_LAYERS.value, drop_layers=_DROP.value,
      importance=_IMP.value, aggregation=_AGG.value, layer_importance=_LIMP.value,
      calib_data=_CALIB.value, calib_samples=_NCAL.value, calib_seq_len=_LCAL.value,
      eval_samples=_NEVAL.value, batch_size=_BATCH.value, seed=_SEED.value,
      layer_task=_TASK.value, layer_task_limit=_TASK_LIMIT.value, data_root=_DATA.value,
      layer_batches=_LBATCH.value,
      scores_npz=_SCORES.value, overwrite=_OVERWRITE.value, dtype=_DTYPE.value,
      mesh=_MESH.value)
  report = prune_job.run(job)
  before, after = report["params_before"], report["params_after"]
  print(f"pruned {before / 1e6:.1f}M -> {after / 1e6:.1f}M parameters "
        f"({after / before:.1%}); wrote {report['output_dir']}")
  if "calibration_ppl_before" in report:
    print(f"held-out calibration perplexity: {report['calibration_ppl_before']:.2f} -> "
          f"{report['calibration_ppl_after']:.2f}")


if __name__ == "__main__":
  app.run(main)
