"""Perplexity and zero-shot accuracy of an HF Llama checkpoint.

  python launch/evaluate.py --model_dir=smollm2-135m --tasks=ppl,winogrande,piqa \
      --ppl_file=data/wikitext-2/test.txt --data_root=data --limit=500 --output_json=eval.json

  python launch/evaluate.py --model_dir=smollm2-135m --tasks=mmlu --num_fewshot=5
  python launch/evaluate.py --model_dir=smollm2-135m --tasks=ppl --protocol=minitron \
      --harness_tasks=arc_easy --limit=100      # lm-evaluation-harness tasks (extra `eval`)

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
_SEQ = flags.DEFINE_integer("seq_len", JOB.seq_len, "Perplexity window length; longest scored "
                            "request.")
_WIN = flags.DEFINE_integer("max_windows", JOB.max_windows, "Cap on perplexity windows.")
_LIMIT = flags.DEFINE_integer("limit", JOB.limit, "First N examples per task.")
_BATCH = flags.DEFINE_integer("batch_size", JOB.batch_size, "Sequences per batch.")
_DTYPE = flags.DEFINE_enum("dtype", JOB.dtype, list(eval_run.DTYPES), "Compute dtype.")
_OUT = flags.DEFINE_string("output_json", JOB.output_json, "Write results here.")
_MESH = flags.DEFINE_string("mesh", JOB.mesh.spec, "Device mesh to shard params and batch rows "
                            "over, e.g. fsdp:-1 or data:2,fsdp:2,tensor:2 (as "
                            "launch/distill.py); empty: one device.")
_PROTOCOL = flags.DEFINE_enum("protocol", JOB.protocol, list(eval_run.PROTOCOLS),
                              "Shots per task by default: zero_shot, or minitron (MMLU 5, "
                              "WinoGrande 5, ARC-Challenge 25, HellaSwag 10; those tasks are "
                              "added to --tasks).")
_SHOTS = flags.DEFINE_string("num_fewshot", JOB.num_fewshot, "Few-shot examples: N for every "
                             "task, or TASK:N,... (overrides --protocol).")
_OK = flags.DEFINE_bool("mmlu_only_ok", JOB.mmlu_only_ok, "MMLU-Redux: score only the "
                        "questions whose original label the re-annotation confirmed.")
_PER_SUBJECT = flags.DEFINE_integer("mmlu_per_subject", JOB.mmlu_per_subject, "MMLU: score "
                                    "only the first N questions of each subject.")
_HARNESS = flags.DEFINE_list("harness_tasks", list(JOB.harness_tasks), "lm-evaluation-harness "
                             "tasks to run through its minitron_jax backend (pip install -e "
                             "'.[eval]'); --num_fewshot=N and --limit apply.")
_INCLUDE = flags.DEFINE_string("harness_include_path", JOB.harness_include_path,
                               "Folder of extra lm-evaluation-harness task YAMLs.")
_QA = flags.DEFINE_string("qa_task", JOB.qa_task, "Closed-book QA from the hub, exact match of "
                          "greedy answers as lm-eval scores it: triviaqa or nq_open, optionally "
                          "with an item cap (triviaqa:200); --num_fewshot applies.")


@cli.main_wrapper
def main(argv):
  del argv
  sharding.initialize_distributed()
  job = JOB(model_dir=_MODEL.value, tasks=tuple(_TASKS.value), data_root=_DATA.value,
            ppl_file=_PPL.value, seq_len=_SEQ.value, max_windows=_WIN.value,
            limit=_LIMIT.value, batch_size=_BATCH.value, dtype=_DTYPE.value,
            mesh=settings.MeshSpec(_MESH.value), output_json=_OUT.value,
            protocol=_PROTOCOL.value, num_fewshot=_SHOTS.value, mmlu_only_ok=_OK.value,
            mmlu_per_subject=_PER_SUBJECT.value, harness_tasks=tuple(_HARNESS.value),
            harness_include_path=_INCLUDE.value, qa_task=_QA.value)
  with settings.named(settings.flag_names()):
    out = eval_run.run(job)
  print(scoring.format_table(list(out["results"].items()),
                             ["ppl", "acc", "acc_stderr", "acc_norm", "acc_macro",
                              "exact_match", "num_fewshot", "tokens", "examples", "seconds"]))
  if "harness" in out:
    from lm_eval.utils import make_table

    print(make_table(out["harness"]))
  if job.output_json:
    print(f"wrote {job.output_json}")


if __name__ == "__main__":
  app.run(main)
