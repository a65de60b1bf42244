"""Our lm-evaluation-harness backend against lm-eval's own `hf` (torch) backend, same machine,
same run: per-request log-likelihood agreement on several tasks, and the time of one task.

  python benchmarks/harness.py --model_dir=smollm2-135m --requests=300 --speed_task=hellaswag

The tasks are harness tasks over the local data files (`harness_tasks.write_tasks`); each
backend scores the first items of each task (about `--requests` requests) zero-shot. Prints
the max |log-likelihood difference| per task, each backend's best time on the speed task
after one untimed run (compilation, caches), and the ratio. With --float64, also each float32
backend's distance from our float64 forward on the same requests (the exact value up to
float64 rounding). Needs the `test` extra (torch).
"""

import math
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.timing import best_seconds  # noqa: E402
from minitron_jax import cli  # noqa: E402

_MODEL = flags.DEFINE_string("model_dir", "smollm2-135m", "Model (HF directory or known name).")
_TASKS = flags.DEFINE_list("tasks", ["piqa", "arc_easy", "hellaswag", "winogrande"],
                           "Tasks whose log-likelihoods are compared.")
_SPEED = flags.DEFINE_string("speed_task", "hellaswag", "The task both backends are timed on "
                             "(\"\": none).")
_REQUESTS = flags.DEFINE_integer("requests", 300, "Requests per task (rounded up to whole "
                                 "items).", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Batch size of both backends.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed runs per backend (best kept).",
                                lower_bound=1)
_DATA = flags.DEFINE_string("data_root", None, "Task data folder (default as the evaluator).")
_F64 = flags.DEFINE_bool("float64", False, "Also score every task with our backend in float64 "
                         "(every step, 64-bit JAX) and with hf in float64, and print how far "
                         "each float32 backend is from that reference.")


def _run(lm, manager, task, limit):
  import lm_eval

  res = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, num_fewshot=0,
                                log_samples=True, task_manager=manager, bootstrap_iters=0)
  return sorted(res["samples"][task], key=lambda s: s["doc_id"])


def _loglik(samples):
  return np.array([r[0][0] for s in samples for r in s["resps"]])


def _float64_backends(model_dir):
  """Our backend in float64 (every step, 64-bit JAX: the reference) and hf in float64, built
  once for every task."""
  import jax
  from lm_eval.models.huggingface import HFLM

  from minitron_jax.evaluate import harness

  with jax.enable_x64(True):
    ours = harness.MinitronLM(model_dir=model_dir, dtype="float64", batch_size=_BATCH.value)
  return ours, HFLM(pretrained=model_dir, dtype="float64", batch_size=_BATCH.value, device="cpu")


def _float64_reference(name, backends, manager, task, limit, ours32, hf32):
  """Prints each backend's max distance from our float64 forward on the same requests: which
  float32 backend is nearer the exact value, and by how much. hf in float64 keeps
  transformers' float32 RMSNorm and RoPE angles, so it is shown, not used."""
  import jax

  ours64, hf64_lm = backends
  with jax.enable_x64(True):
    ref = _loglik(_run(ours64, manager, task, limit))
  hf64 = _loglik(_run(hf64_lm, manager, task, limit))
  worst = int(np.argmax(np.abs(ours32 - hf32)))
  print(f"{name} against our float64 forward: max |diff| ours float32 "
        f"{np.max(np.abs(ours32 - ref)):.2e}, hf float32 {np.max(np.abs(hf32 - ref)):.2e}, "
        f"hf float64 {np.max(np.abs(hf64 - ref)):.2e}; the request the float32 backends differ "
        f"most on ({ours32[worst] - hf32[worst]:+.2e}): ours {ours32[worst] - ref[worst]:+.2e}, "
        f"hf {hf32[worst] - ref[worst]:+.2e} from float64 (log-likelihood {ref[worst]:.3f})",
        flush=True)


@cli.main_wrapper
def main(argv):
  del argv
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager

  from minitron_jax.evaluate import harness, harness_tasks, sources
  from minitron_jax.io import registry

  model_dir = str(registry.resolve_model_dir(_MODEL.value))
  names = list(dict.fromkeys(_TASKS.value + ([_SPEED.value] if _SPEED.value else [])))
  with tempfile.TemporaryDirectory() as tmp:
    harness_tasks.write_tasks(tmp, names, _DATA.value)
    manager = TaskManager(include_path=tmp, include_defaults=False)
    ours = harness.MinitronLM(model_dir=model_dir, dtype="float32", batch_size=_BATCH.value)
    ref = HFLM(pretrained=model_dir, dtype="float32", batch_size=_BATCH.value, device="cpu")
    backends64 = _float64_backends(model_dir) if _F64.value else None
    for name in names:
      per_item = len(sources.load_examples(name, _DATA.value, limit=1)[0].requests)
      limit = math.ceil(_REQUESTS.value / per_item)
      task = harness_tasks.PREFIX + name
      a, b = _run(ours, manager, task, limit), _run(ref, manager, task, limit)
      ll_a, ll_b = _loglik(a), _loglik(b)
      acc_a, acc_b = np.mean([s["acc"] for s in a]), np.mean([s["acc"] for s in b])
      print(f"{name}: {len(ll_a)} requests, max |loglik diff| {np.max(np.abs(ll_a - ll_b)):.2e}, "
            f"acc ours {acc_a:.4f} hf {acc_b:.4f}", flush=True)
      if _F64.value:
        _float64_reference(name, backends64, manager, task, limit, ll_a, ll_b)
      if name == _SPEED.value:
        # The timer blocks on what the call returns: None, the samples are not arrays.
        t_ours = best_seconds(lambda: _run(ours, manager, task, limit) and None, _REPEATS.value)
        t_ref = best_seconds(lambda: _run(ref, manager, task, limit) and None, _REPEATS.value)
        print(f"{name} ({len(ll_a)} requests): minitron_jax {t_ours:.1f} s, hf {t_ref:.1f} s, "
              f"speed-up {t_ref / t_ours:.2f}x", flush=True)


if __name__ == "__main__":
  app.run(main)
