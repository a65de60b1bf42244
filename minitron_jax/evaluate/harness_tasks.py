"""lm-evaluation-harness task YAMLs over this package's task data (no hub needed).

``write_tasks`` turns the items of our tasks (from a local folder or the hub, as `sources`
finds them) into JSONL files and harness task configs reading them (``dataset_path: json``),
named ``local_<task>``; MMLU becomes one task per subject (``local_mmlu_<subject>``, the
harness's ``first_n`` shots from the same subject) and the group ``local_mmlu``. The harness
then builds the same prompts as our evaluator (`fewshot`), so the two can be compared item by
item, and any harness backend (ours, ``hf``) can score our data:

  minitron-lm-eval --model minitron_jax --model_args model_dir=smollm2-135m \\
      --include_path DIR --tasks local_piqa,local_mmlu --num_fewshot 5

Needs no lm-eval itself: the files are plain text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from minitron_jax.evaluate import sources
from minitron_jax.evaluate.tasks import Example

PREFIX = "local_"


def doc(ex: Example) -> dict:
  """One harness document of an example: a single context with the choices, or (WinoGrande)
  one context per choice with a shared target."""
  choices = [r.continuation.removeprefix(" ") for r in ex.requests]
  out = {"description": ex.description, "label": ex.label, "group": ex.group}
  if len({r.continuation for r in ex.requests}) == 1 and len(ex.requests) > 1:
    return {**out, "contexts": [r.context for r in ex.requests], "target": choices[0]}
  return {**out, "context": ex.requests[0].context, "choices": choices}


def task_config(task: str, data_file: str | os.PathLike, multiple_input: bool,
                metrics: Sequence[str], sampler: str = "default") -> str:
  """A harness task config (YAML, written as JSON, which YAML reads) over one JSONL file;
  shots come from the scored file itself, never the scored item."""
  cfg = {
    "task": task,
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"test": os.fspath(data_file)}},
    "test_split": "test",
    "fewshot_split": "test",
    "fewshot_config": {"sampler": sampler},
    "output_type": "multiple_choice",
    "description": "{{description}}",
    "doc_to_text": "label" if multiple_input else "context",
    "doc_to_choice": "contexts" if multiple_input else "choices",
    "doc_to_target": "target" if multiple_input else "label",
    "target_delimiter": " ",
    "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                    for m in metrics],
    "metadata": {"version": 1.0},
  }
  return json.dumps(cfg, indent=1) + "\n"


def _write(path: Path, text: str) -> None:
  path.write_text(text, encoding="utf-8")


def write_tasks(out_dir: str | os.PathLike, names: Sequence[str],
                data_root: str | os.PathLike | None = None) -> list[str]:
  """Harness tasks for our tasks `names` (multiple-choice ones: not ``lambada``) in `out_dir`
  (pass it as ``--include_path``); returns the harness task names."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  written = []
  for name in names:
    if name in ("ppl", "lambada"):
      raise ValueError(f"{name}: only multiple-choice tasks become harness tasks here")
    examples = sources.load_examples(name, data_root)
    docs = [doc(ex) for ex in examples]
    multiple = "contexts" in docs[0]
    metrics = ("acc",) if name in ("winogrande", "mmlu") else ("acc", "acc_norm")
    if name != "mmlu":
      data = out / f"{PREFIX}{name}.jsonl"
      _write(data, "".join(json.dumps(d) + "\n" for d in docs))
      _write(out / f"{PREFIX}{name}.yaml", task_config(PREFIX + name, data, multiple, metrics))
      written.append(PREFIX + name)
      continue
    subjects = sorted({d["group"] for d in docs})
    for subject in subjects:
      task = f"{PREFIX}mmlu_{subject}"
      data = out / f"{task}.jsonl"
      _write(data, "".join(json.dumps(d) + "\n" for d in docs if d["group"] == subject))
      _write(out / f"{task}.yaml", task_config(task, data, False, metrics, "first_n"))
    group = {"group": f"{PREFIX}mmlu", "task": [f"{PREFIX}mmlu_{s}" for s in subjects],
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
             "metadata": {"version": 1.0}}
    _write(out / f"{PREFIX}mmlu.yaml", json.dumps(group, indent=1) + "\n")
    written.append(f"{PREFIX}mmlu")
  return written
