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

from minitron_jax import cli, settings, sharding  # noqa: E402
from minitron_jax.evaluate import run as eval_run  # noqa: E402
from minitron_jax.evaluate import scoring  # noqa: E402

JOB = eval_run.EvalJob  # every flag's default is the job's

_MODEL = flags.DEFINE_string("model_dir", "smollm2-135m",
                             "HF model directory, a known short name, or a hub id.")
_TASKS = flags.DEFINE_list("tasks", ",".join(JOB.tasks),
                           "Tasks to run (ppl = perplexity of --ppl_file).")
_DATA = flags.DEFINE_string("data_root", JOB.data_root, "Folder of task data (default: "
                            "$MINITRON_JAX_DATA_ROOT, ../shared/data beside the project, then "
                            "the Hugging Face hub).")
_PPL = flags.DEFINE_string("ppl_file", JOB.ppl_file, "UTF-8 text for perplexity (default: the "
                           "WikiText-2 test text, found as the task data is).")
_SEQ = flags.DEFINE_integer("seq_len", JOB.seq_len, "Perplexity window length.")
_WIN = flags.DEFINE_integer("max_windows", JOB.max_windows, "Cap on perplexity windows.")
_LIMIT = flags.DEFINE_integer("limit", JOB.limit, "First N examples per task.")
_BATCH = flags.DEFINE_integer("batch_size", JOB.batch_size, "Sequences per batch.")
_DTYPE = flags.DEFINE_enum("dtype", JOB.dtype, list(eval_run.DTYPES), "Compute dtype.")
_OUT = flags.DEFINE_string("output_json", JOB.output_json, "Write results here.")
_MESH = flags.DEFINE_string("mesh", JOB.mesh.spec, "Device mesh to shard params and batch rows "
                            "over, e.g. fsdp:-1 or data:2,fsdp:2,tensor:2 (as "
                            "launch/distill.py); empty: one device.")


@cli.main_wrapper
def main(argv):
  del argv
  sharding.initialize_distributed()
  job = JOB(model_dir=_MODEL.value, tasks=tuple(_TASKS.value), data_root=_DATA.value,
            ppl_file=_PPL.value, seq_len=_SEQ.value, max_windows=_WIN.value,
            limit=_LIMIT.value, batch_size=_BATCH.value, dtype=_DTYPE.value,
            mesh=settings.MeshSpec(_MESH.value), output_json=_OUT.value)
  with settings.named(settings.flag_names()):
    out = eval_run.run(job)
  print(scoring.format_table(list(out["results"].items()),
                             ["ppl", "acc", "acc_norm", "tokens", "examples", "seconds"]))
  if job.output_json:
    print(f"wrote {job.output_json}")


if __name__ == "__main__":
  app.run(main)
