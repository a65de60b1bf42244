"""Few-shot prompts and samplers, MMLU's averages and the job's shot settings."""

import math

import numpy as np
import pytest

from minitron_jax.evaluate import fewshot, run as eval_run, tasks
from minitron_jax.evaluate.tasks import Example, Request
from minitron_jax.settings import SettingError


def _ex(i: int, group: str = "g") -> Example:
  return Example("t", (Request(f"Q{i}:", " yes"), Request(f"Q{i}:", " no")), i % 2,
                 description="D\n\n", group=group)


def test_prompt_is_description_shots_query():
  ex, shots = _ex(0), [_ex(1), _ex(2)]
  got = fewshot.prompted(ex, shots)
  assert got.requests[1] == Request("D\n\nQ1: no\n\nQ2: yes\n\nQ0:", " no")
  assert got.description == "" and got.label == 0


def test_random_shots_are_deterministic_and_never_the_item():
  examples = [_ex(i) for i in range(20)]
  a, b = fewshot.random_shots(examples, 3), fewshot.random_shots(examples, 3)
  assert a == b
  for ex, shots in zip(examples, a):
    assert len(shots) == 3 and ex not in shots
  with pytest.raises(ValueError, match="20 items"):
    fewshot.random_shots(examples, 20)


def test_first_n_shots_by_subject():
  examples = [_ex(i, "a") for i in range(4)] + [_ex(i, "b") for i in range(4, 7)]
  shots = fewshot.first_n_shots(examples, 2)
  assert shots[0] == [examples[1], examples[2]] and shots[1] == [examples[0], examples[2]]
  assert shots[4] == [examples[5], examples[6]]
  dev = [_ex(10, "b"), _ex(11, "a"), _ex(12, "a")]
  assert fewshot.first_n_shots(examples[:1], 2, dev)[0] == dev[1:]
  with pytest.raises(ValueError, match="3 shots asked, 2 items"):
    fewshot.first_n_shots(examples[4:], 3)


def test_mmlu_prompt():
  ex = tasks.mmlu_example("high_school_physics", " What? ", ["1", "2", "3", "4"], 2)
  assert ex.description == ("The following are multiple choice questions (with answers) "
                            "about high school physics.\n\n")
  assert ex.requests[0].context == "What?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
  assert [r.continuation for r in ex.requests] == [" A", " B", " C", " D"]


def test_group_summary_against_numpy():
  groups = ["a"] * 4 + ["b"] * 10
  correct = [1, 0, 0, 1] + [1] * 7 + [0] * 3
  out = fewshot.group_summary(groups, correct)
  assert out["acc"] == pytest.approx(np.mean(correct))
  assert out["acc_macro"] == pytest.approx((0.5 + 0.7) / 2)
  se = [np.std(np.array(c, float), ddof=1) / math.sqrt(len(c)) for c in (correct[:4], correct[4:])]
  assert out["acc_macro_stderr"] == pytest.approx(math.sqrt(se[0] ** 2 + se[1] ** 2) / 2)
  assert out["acc_stderr"] == pytest.approx(np.std(correct, ddof=1) / math.sqrt(14))


def test_job_shots_and_bad_spec():
  job = eval_run.EvalJob("m", tasks=("ppl", "mmlu", "piqa"), protocol="minitron")
  assert job.run_tasks() == ("ppl", "mmlu", "piqa", "winogrande", "arc_challenge", "hellaswag")
  assert job.shots() == {"mmlu": 5, "piqa": 0, "winogrande": 5, "arc_challenge": 25,
                         "hellaswag": 10}
  job = eval_run.EvalJob("m", tasks=("ppl",), protocol="minitron", num_fewshot="hellaswag:0")
  assert job.run_tasks() == ("ppl", "mmlu", "winogrande", "arc_challenge", "hellaswag")
  assert job.shots()["hellaswag"] == 0 and job.shots()["arc_challenge"] == 25
  job = eval_run.EvalJob("m", tasks=("ppl", "piqa"), protocol="minitron", protocol_tasks=False)
  assert job.run_tasks() == ("ppl", "piqa") and job.shots() == {"piqa": 0}
  assert eval_run.EvalJob("m", tasks=("piqa",)).run_tasks() == ("piqa",)
  job = eval_run.EvalJob("m", tasks=("mmlu", "piqa"), num_fewshot="3,piqa:1")
  assert job.shots() == {"mmlu": 3, "piqa": 1}
  with pytest.raises(SettingError, match="num_fewshot"):
    eval_run.EvalJob("m", tasks=("piqa",), num_fewshot="piqa:x").validate()
  with pytest.raises(SettingError, match="protocol"):
    eval_run.EvalJob("m", tasks=("piqa",), protocol="papers").validate()


def test_job_qa_task():
  job = eval_run.EvalJob("m", tasks=("ppl",), qa_task="triviaqa:200", limit=50,
                         num_fewshot="triviaqa:5")
  assert job.qa() == ("triviaqa", 200) and job.shots() == {"triviaqa": 5}
  job = eval_run.EvalJob("m", tasks=("ppl",), qa_task="nq_open", limit=50, num_fewshot="2")
  assert job.qa() == ("nq_open", 50) and job.shots() == {"nq_open": 2}
  assert eval_run.EvalJob("m", tasks=("ppl",)).qa() is None
  for bad in ("trivia", "triviaqa:0"):
    with pytest.raises(SettingError, match="qa_task"):
      eval_run.EvalJob("m", tasks=("ppl",), qa_task=bad).validate()


def test_mmlu_redux_subsets(data_root):
  from collections import Counter

  from minitron_jax.evaluate import sources

  got = sources.load_prompted("mmlu", data_root, per_group=2, limit=7, num_fewshot=1)
  assert len(got) == 7 and max(Counter(ex.group for ex in got).values()) == 2
  assert len({ex.group for ex in got}) == 4
  ok = sources.load_prompted("mmlu", data_root, only_ok=True)
  assert len(ok) == 5316 and not any(ex.flagged for ex in ok)
