"""Perplexity and zero-shot accuracy of an HF Llama checkpoint.

  python launch/evaluate.py --model_dir=smollm2-135m --tasks=ppl,winogrande,piqa \
      --ppl_file=data/wikitext-2/test.txt --data_root=data --limit=500 --output_json=eval.json

Task data and the WikiText-2 text come from --data_root (else $MINITRON_JAX_DATA_ROOT), else
../shared/data beside the project, else the Hugging Face hub (see minitron_jax.evaluate.sources).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from minitron_jax import cli, sharding  # noqa: E402
from minitron_jax.evaluate import sources  # noqa: E402
from minitron_jax.io import files  # noqa: E402
from minitron_jax.io import hf as hf_io  # noqa: E402
from minitron_jax.evaluate import scoring as evaluate  # noqa: E402

ALL_TASKS = "ppl,winogrande,piqa,hellaswag,arc_easy,arc_challenge,lambada,openbookqa"
_MODEL = flags.DEFINE_string("model_dir", "smollm2-135m",
                             "HF model directory, a known short name, or a hub id.")
_TASKS = flags.DEFINE_list("tasks", ALL_TASKS, "Tasks to run (ppl = perplexity of --ppl_file).")
_DATA = flags.DEFINE_string("data_root", None, "Folder of task data (default: "
                            "$MINITRON_JAX_DATA_ROOT, ../shared/data beside the project, then "
                            "the Hugging Face hub).")
_PPL = flags.DEFINE_string("ppl_file", None, "UTF-8 text for perplexity (default: the "
                           "WikiText-2 test text, found as the task data is).")
_SEQ = flags.DEFINE_integer("seq_len", 1024, "Perplexity window length.", lower_bound=2)
_WIN = flags.DEFINE_integer("max_windows", None, "Cap on perplexity windows.", lower_bound=1)
_LIMIT = flags.DEFINE_integer("limit", None, "First N examples per task.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Sequences per batch.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_OUT = flags.DEFINE_string("output_json", None, "Write results here.")
_MESH = flags.DEFINE_string("mesh", "", "Device mesh to shard params and batch rows over, e.g. fsdp:-1 or data:2,fsdp:2,tensor:2 (as launch/distill.py); empty: one device.")


@cli.main_wrapper
def main(argv):
  del argv
  sharding.initialize_distributed()
  sources.require_eval_data(_TASKS.value, _DATA.value, ppl_file=_PPL.value)
  params, cfg, tok, path = hf_io.load_model(_MODEL.value, _DTYPE.value)
  results = evaluate.run_evaluation(
      params, cfg, tok, _TASKS.value, data_root=_DATA.value, ppl_file=_PPL.value,
      seq_len=_SEQ.value, max_windows=_WIN.value, limit=_LIMIT.value,
      batch_size=_BATCH.value, mesh=sharding.stage_mesh(_MESH.value))
  print(evaluate.format_table(list(results.items()),
                              ["ppl", "acc", "acc_norm", "tokens", "examples", "seconds"]))
  if _OUT.value:
    files.write_json(_OUT.value, {"model_dir": path, "results": results})
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
