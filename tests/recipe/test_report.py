"""The report's "What wins" and gap-recovered sentences on hand-made evaluation results."""

import math

from minitron_jax.recipe import jobs, report


def _ev(name, ppl_windows=None, tasks=None, heldout=None):
  res = {}
  if ppl_windows is not None:
    nll = sum(ppl_windows) / len(ppl_windows)
    res["ppl"] = {"ppl": math.exp(nll), "window_nll": ppl_windows, "windows": len(ppl_windows)}
  if heldout is not None:
    res["heldout_ppl"] = {"ppl": heldout}
  for t, (acc, n) in (tasks or {}).items():
    res[t] = {"acc": acc, "acc_norm": acc, "examples": n}
  return {"name": name, "label": report.label(name), "results": res, "params": 1,
          "size_bytes": 1, "decode_tokens_per_second": 1.0, "samples": [], "repetition": [0.5]}


def test_ppl_win_needs_two_standard_errors():
  # differences 1.0, 1.1, 0.9: mean 1.0, SE 0.1/sqrt(3) = 0.058 -> a clear win for a
  a, b = _ev("distill_width", [3.0, 3.1, 2.9]), _ev("distill_depth", [4.0, 4.2, 3.8])
  text = report.compare_ppl(a["results"]["ppl"], b["results"]["ppl"], "A", "B")
  assert text.startswith("**A** wins") and "e" in text and "3 windows" in text
  assert f"{math.exp(1.0):.2f}x" in text
  # differences +0.5, -0.4, +0.2: mean 0.1, SE 0.265 -> within noise
  a, b = _ev("distill_width", [3.5, 2.6, 3.2]), _ev("distill_depth", [3.0, 3.0, 3.0])
  text = report.compare_ppl(a["results"]["ppl"], b["results"]["ppl"], "A", "B")
  assert text.startswith("within noise")


def test_accuracy_win_needs_two_standard_errors():
  # 0.60 vs 0.50 at n=101: se 0.0490 and 0.0503, combined 0.0702; 0.10 < 0.14 -> noise
  ra = {"piqa": {"acc": 0.6, "examples": 101}}
  rb = {"piqa": {"acc": 0.5, "examples": 101}}
  assert "piqa within noise (+10.0 ± 7.0 points)" in report.compare_tasks(ra, rb, "A", "B")
  # 0.70 vs 0.50 at n=401: se 0.0229 and 0.0250, combined 0.0339; 0.20 > 0.068 -> B loses
  ra = {"piqa": {"acc_norm": 0.5, "acc": 0.5, "examples": 401}}
  rb = {"piqa": {"acc_norm": 0.7, "acc": 0.7, "examples": 401}}
  assert "piqa: **B** (-20.0 ± 3.4 points)" in report.compare_tasks(ra, rb, "A", "B")


def test_comparisons_and_recovery_sentences():
  evals = [_ev("teacher", [3.0, 3.0], heldout=20.0),
           _ev("pruned_width", [7.0, 7.0], heldout=400.0),
           _ev("distill_width", [4.0, 4.02], {"piqa": (0.6, 201)}, heldout=40.0),
           _ev("baseline_pruned_ce", [4.5, 4.51], {"piqa": (0.58, 201)}, heldout=45.0)]
  comp = report.comparisons(evals)
  assert len(comp) == 1 and "**distilled, width** wins" in comp[0]
  assert "piqa within noise" in comp[0]
  rec = report.recovery(evals)
  # log-ppl: teacher 3, pruned 7, distilled 4.01 -> (7 - 4.01) / 4 = 74.75 %
  assert len(rec) == 1 and "WikiText-2 75 %" in rec[0]
  held = (math.log(400) - math.log(40)) / (math.log(400) - math.log(20))
  assert f"held-out training data {100 * held:.0f} %" in rec[0]


def test_table_shows_stderr_examples_and_repetition():
  table = report.results_table([_ev("teacher", [3.0], {"piqa": (0.6, 101)})])
  assert "piqa (n=101)" in table and "60.0 ± 4.9" in table and "repeated 3-grams" in table
  assert "| 50.0 |" in table
  ev = _ev("teacher", [3.0], {"mmlu": (0.3, 57)})
  ev["results"]["mmlu"]["num_fewshot"] = 5
  assert "mmlu (5-shot, n=57)" in report.results_table([ev])
  ev["results"]["triviaqa"] = {"exact_match": 0.25, "exact_match_stderr": 0.0435,
                               "examples": 100, "num_fewshot": 0}
  table = report.results_table([ev, _ev("distill_width", [3.1], {"mmlu": (0.3, 57)})])
  assert "triviaqa EM (n=100)" in table and "25.0 ± 4.3" in table
  assert table.splitlines()[-1].count("–") == 1  # the student was not asked


def test_zero_shot_only_for_the_models_the_report_compares():
  from configs import base

  cfg = base.get_config()
  full, ref = list(cfg.eval.tasks), ["ppl"]
  assert len(full) > 1 and cfg.correction.steps > 0
  want = {"teacher": ref, "corrected": full, "pruned_width": ref, "distill_width": full,
          "pruned_depth": ref, "distill_depth": full, "pruned_search": ref,
          "distill_search": full, "baseline_pruned_ce": full, "baseline_random_ce": full,
          "quantized/int8": ref}
  assert {n: report.model_tasks(cfg, n) for n in want} == want
  cfg.eval.qa_task, cfg.eval.protocol = "triviaqa:20", "minitron"
  for name, job in ((n, jobs.eval_job(cfg, "m", report.model_tasks(cfg, n),
                                      reference=report.is_reference(cfg, n))) for n in want):
    compared = want[name] == full
    assert job.qa() == (("triviaqa", 20) if compared else None), name
    assert ("hellaswag" in job.run_tasks() and "mmlu" in job.run_tasks()) == compared, name
  cfg.correction.steps = 0  # the downloaded teacher is then the one the students come from
  assert report.model_tasks(cfg, "teacher") == full
  cfg.eval.reference_tasks = ()
  assert all(report.model_tasks(cfg, n) == full for n in want)
