"""The lm-evaluation-harness backend against our own evaluator and against lm-eval's `hf`
(torch) backend, on harness tasks defined over the local data files (no hub).

MINITRON_JAX_HARNESS_REQUESTS sets how many requests per task the real-teacher comparison
with `hf` scores (default 50; the figures in docs/evaluation.md use 300).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from minitron_jax.evaluate import harness, harness_tasks, scoring, sources, tasks  # noqa: E402
from minitron_jax.io import hf as hf_io, registry  # noqa: E402

HF_TASKS = ("piqa", "arc_easy", "hellaswag", "winogrande")
REQUESTS = int(os.environ.get("MINITRON_JAX_HARNESS_REQUESTS", "50"))


@pytest.fixture(scope="module")
def manager(tmp_path_factory, data_root):
  out = tmp_path_factory.mktemp("harness_tasks")
  harness_tasks.write_tasks(out, [*HF_TASKS, "mmlu"], data_root)
  return TaskManager(include_path=str(out), include_defaults=False)


@pytest.fixture(scope="module")
def tiny():
  d = registry.resolve_model_dir("smollm2-tiny-random")
  params, cfg, tok, _ = hf_io.load_model(str(d))
  return str(d), params, cfg, tok


def _samples(lm, manager, task_names, shots, limit):
  res = lm_eval.simple_evaluate(model=lm, tasks=list(task_names), num_fewshot=shots,
                                limit=limit, log_samples=True, task_manager=manager,
                                bootstrap_iters=0)
  return res["samples"]


@pytest.mark.parametrize("shots", [0, 2])
def test_inhouse_equals_backend_item_by_item(tiny, manager, data_root, shots):
  """Same items, same prompts (the harness renders them from our task files, with its own
  few-shot samplers), same log-likelihoods and the same answer per item."""
  _, params, cfg, tok = tiny
  lm = harness.MinitronLM(params=params, cfg=cfg, tokenizer=tok, max_length=1024)
  ours = {"piqa": "local_piqa", "winogrande": "local_winogrande",
          "mmlu": "local_mmlu_abstract_algebra"}
  samples = _samples(lm, manager, ours.values(), shots, 6)
  for name, task in ours.items():
    examples = sources.load_prompted(name, data_root, limit=6, num_fewshot=shots)
    flat = [p for ps in tasks.tokenize_requests(examples, tok) for p in ps]
    lls, greedy = scoring.loglikelihoods(params, cfg, flat, max_len=1024)
    acc, _ = scoring.item_scores(name, examples, lls, greedy)
    got = sorted(samples[task], key=lambda s: s["doc_id"])
    assert len(got) == len(examples) == 6
    k = 0
    for ex, item, a in zip(examples, got, acc):
      assert [tuple(r) for r in item["arguments"]] == [(r.context, r.continuation)
                                                       for r in ex.requests], (name, ex)
      theirs = [ll for ll, _ in (r[0] for r in item["resps"])]
      np.testing.assert_allclose(theirs, lls[k: k + len(ex.requests)], atol=1e-6)
      k += len(ex.requests)
      assert bool(item["acc"]) == a, (name, item["doc_id"])


def test_registered_and_built_from_model_args(tiny):
  d, *_ = tiny
  cls = lm_eval.api.registry.get_model(harness.MODEL_NAME)
  assert cls is harness.MinitronLM
  lm = cls.create_from_arg_string(f"model_dir={d},dtype=float32", {"batch_size": 4})
  assert lm.batch_size == 4 and lm.max_length == lm.cfg.max_position_embeddings
  with pytest.raises(ValueError, match="model_dir"):
    cls()


def test_rolling_generation_and_quantized_params_match_hf(tiny):
  """Rolling log-likelihood over several windows and greedy generation with stop strings
  against lm-eval's hf backend on the same checkpoint; int8 params score close to float."""
  from lm_eval.models.huggingface import HFLM

  from minitron_jax.quantize import formats

  d, params, cfg, tok = tiny
  ours = harness.MinitronLM(params=params, cfg=cfg, tokenizer=tok, max_length=48,
                            batch_size=4)
  ref = HFLM(pretrained=d, dtype="float32", max_length=48, batch_size=4, device="cpu")
  text = "The quick brown fox jumps over the lazy dog. " * 12
  rolling = [Instance("loglikelihood_rolling", {}, (t,), i)
             for i, t in enumerate([text, "Hello world."])]
  np.testing.assert_allclose(ours.loglikelihood_rolling(rolling),
                             ref.loglikelihood_rolling(rolling), atol=1e-3)
  gen = [Instance("generate_until", {}, (c, {"until": ["."], "max_gen_toks": 8,
                                             "do_sample": False}), i)
         for i, c in enumerate(["Once upon a time", "Question: What is 2+2?\nAnswer:"])]
  assert ours.generate_until(gen) == ref.generate_until(gen)
  pairs = [Instance("loglikelihood", {}, ("Question: Is the sky blue?\nAnswer:", c), i)
           for i, c in enumerate([" yes", " no"])]
  float_ll = [ll for ll, _ in ours.loglikelihood(pairs)]
  np.testing.assert_allclose(float_ll, [ll for ll, _ in ref.loglikelihood(pairs)], atol=1e-3)
  q = formats.quantize_params(params, cfg, "int8_channel")
  quant = harness.MinitronLM(params=q, cfg=cfg, tokenizer=tok, max_length=48)
  q_ll = [ll for ll, _ in quant.loglikelihood(pairs)]
  assert q_ll != float_ll and np.allclose(q_ll, float_ll, atol=0.05)


@pytest.mark.slow
def test_teacher_loglikelihoods_match_hf_backend(real_dir, manager):
  """Per request, our backend and lm-eval's hf backend agree to 1e-3 on the real teacher."""
  from lm_eval.models.huggingface import HFLM

  ours = harness.MinitronLM(model_dir=str(real_dir), dtype="float32")
  ref = HFLM(pretrained=str(real_dir), dtype="float32", batch_size=16, device="cpu")
  per_doc = {"piqa": 2, "arc_easy": 4, "hellaswag": 4, "winogrande": 2}
  for name in HF_TASKS:
    task = f"local_{name}"
    limit = math.ceil(REQUESTS / per_doc[name])
    a = sorted(_samples(ours, manager, [task], 0, limit)[task], key=lambda s: s["doc_id"])
    b = sorted(_samples(ref, manager, [task], 0, limit)[task], key=lambda s: s["doc_id"])
    ll_a = [r[0][0] for s in a for r in s["resps"]]
    ll_b = [r[0][0] for s in b for r in s["resps"]]
    assert len(ll_a) == len(ll_b) >= REQUESTS
    assert np.max(np.abs(np.subtract(ll_a, ll_b))) <= 1e-3, name
