"""Closed-book QA (triviaqa, nq_open): our evaluator against lm-evaluation-harness's own task
YAMLs, filters and metric, on local folders laid out as the hub repositories are.

The harness side reads lm-eval's shipped ``triviaqa`` / ``nq_open`` YAMLs with only
``dataset_path`` pointed at the folder, and generates through our backend; our side builds
prompts, shots and exact match itself. Answers are the tiny random model's own greedy
outputs for some items (in another case and with punctuation, so the normalisation matters),
so exact match is neither all 0 nor all 1.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from minitron_jax.evaluate import qa, sources
from minitron_jax.evaluate.tasks import HubSource

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")
from helpers import offline_datasets  # noqa: E402

GEN_TOKS = 12
_TRIVIA = pa.schema([("question", pa.string()), ("question_id", pa.string()),
                     ("answer", pa.struct([("aliases", pa.list_(pa.string())),
                                           ("value", pa.string())]))])
_NQ = pa.schema([("question", pa.string()), ("answer", pa.list_(pa.string()))])
_WORDS = ("capital river author painter largest planet first king city year ocean war "
          "metal symbol opera founded tallest mountain language currency").split()


def _question(rnd: random.Random) -> str:
  return " ".join(rnd.choice(_WORDS) for _ in range(rnd.randint(3, 7))).capitalize()


def _rows(name: str, n: int, seed: int, answers=None) -> list[dict]:
  rnd = random.Random(seed)
  out = []
  for i in range(n):
    alias = answers[i] if answers else [rnd.choice(_WORDS).title(), rnd.choice(_WORDS)]
    q = _question(rnd)
    out.append({"question": q, "question_id": f"q{seed}_{i}",
                "answer": {"aliases": alias, "value": alias[0]}} if name == "triviaqa" else
               {"question": q, "answer": alias})
  return out


def _write(repo: Path, name: str, splits: dict[str, list[dict]]) -> None:
  """triviaqa: config rc.nocontext named in the README's YAML; nq_open: data/<split>-*."""
  for split, rows in splits.items():
    rel = f"rc.nocontext/{split}-00000-of-00001.parquet" if name == "triviaqa" else \
        f"data/{split}-00000-of-00001.parquet"
    path = repo / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=_TRIVIA if name == "triviaqa" else _NQ), path)
  if name == "triviaqa":
    lines = ["---", "configs:", "- config_name: rc.nocontext", "  data_files:"]
    lines += [f"  - split: {s}\n    path: rc.nocontext/{s}-*" for s in splits]
    (repo / "README.md").write_text("\n".join(lines + ["---", ""]), encoding="utf-8")


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("qa_hub")
  with offline_datasets(tmp) as mp:
    qa._hub.cache_clear()
    yield tmp, mp
  qa._hub.cache_clear()


@pytest.fixture(scope="module")
def tiny():
  from minitron_jax.io import hf as hf_io, registry

  params, cfg, tok, _ = hf_io.load_model(str(registry.resolve_model_dir("smollm2-tiny-random")))
  return params, cfg, tok


def _mirror(isolated, tiny, name: str, n: int = 6, shots: int = 2) -> Path:
  """The task's repo with answers that make about half the items right: the model's own
  answers (case and punctuation changed) for the even items."""
  tmp, mp = isolated
  params, cfg, tok = tiny
  train = _rows(name, 40, seed=1)
  first = _rows(name, n, seed=2)
  prompts = [q.prompt for q in qa.build_items(name, first, shots, train)]
  preds = qa.generate_answers(params, cfg, tok, prompts, max_gen_toks=GEN_TOKS, max_len=512)
  answers = [["zzz", f"{p.strip().upper()}!"] if i % 2 == 0 and p.strip() else ["zzz"]
             for i, p in enumerate(preds)]
  repo = tmp / name
  _write(repo, name, {"train": train, "validation": _rows(name, n, seed=2, answers=answers)})
  s = qa.QA_SPECS[name]
  mp.setitem(qa.QA_SPECS, name, dataclasses.replace(
      s, scored=dataclasses.replace(s.scored, repo=str(repo)),
      train=dataclasses.replace(s.train, repo=str(repo))))
  return repo


def test_exact_match_is_the_harness_metric():
  """Against lm-eval's own metric function, with the YAMLs' options."""
  metrics = pytest.importorskip("lm_eval.api.metrics")
  cases = [("The Eiffel Tower", ["eiffel tower"]), (" Paris.", ["paris"]), ("U.S.A", ["usa"]),
           ("an apple", ["Apple"]), ("Rome", ["Milan", "rome!"]), ("4", ["four"]), ("", ["x"])]
  for name in qa.QA_TASKS:
    regexes = qa.QA_SPECS[name].regexes_to_ignore
    for pred, golds in cases:
      ref = metrics.exact_match_hf_evaluate(
          predictions=[pred.strip()] * len(golds), references=golds, ignore_case=True,
          ignore_punctuation=True, regexes_to_ignore=list(regexes) or None)["exact_match"]
      assert qa.exact_match(pred, golds, regexes) == (ref > 0), (name, pred, golds)
  assert qa.exact_match("The Alps", ["alps"], qa.QA_SPECS["nq_open"].regexes_to_ignore)
  assert not qa.exact_match("The Alps", ["alps"])


def test_parse_qa_task_and_offline_refusal(isolated):
  assert qa.parse_qa_task("triviaqa:200") == ("triviaqa", 200)
  assert qa.parse_qa_task("nq_open") == ("nq_open", None)
  for bad in ("trivia", "triviaqa:0", "triviaqa:x"):
    with pytest.raises(ValueError):
      qa.parse_qa_task(bad)
  problems = qa.check_data("triviaqa", probe=lambda src: "offline")
  assert len(problems) == 1 and "triviaqa" in problems[0] and "mandarjoshi/trivia_qa" in problems[0]
  assert qa.check_data("triviaqa", probe=lambda src: None) == []
  missing = HubSource(str(isolated[0] / "no_such_repo"), None, "validation")
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(qa.QA_SPECS, "nq_open", dataclasses.replace(qa.QA_SPECS["nq_open"],
                                                           scored=missing))
    with pytest.raises(sources.EvalDataError, match="nq_open"):
      qa.load_items("nq_open", limit=2)


@pytest.mark.parametrize("name", qa.QA_TASKS)
def test_inhouse_equals_harness_item_by_item(isolated, tiny, name):
  """Same prompts (shots from the train split included), same answers, same exact match."""
  lm_eval = pytest.importorskip("lm_eval")
  import yaml
  from lm_eval.tasks import TaskManager

  from minitron_jax.evaluate import harness

  params, cfg, tok = tiny
  repo = _mirror(isolated, tiny, name)
  yaml_name = {"triviaqa": "triviaqa/default.yaml", "nq_open": "nq_open/nq_open.yaml"}[name]
  own = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / yaml_name).read_text())
  own.update(task=f"mirror_{name}", dataset_path=str(repo))
  include = isolated[0] / f"yaml_{name}"
  include.mkdir(exist_ok=True)
  (include / f"mirror_{name}.yaml").write_text(yaml.safe_dump(own), encoding="utf-8")
  lm = harness.MinitronLM(params=params, cfg=cfg, tokenizer=tok, max_length=512,
                          max_gen_toks=GEN_TOKS)
  res = lm_eval.simple_evaluate(model=lm, tasks=[f"mirror_{name}"], num_fewshot=2, limit=6,
                                log_samples=True, bootstrap_iters=0,
                                task_manager=TaskManager(include_path=str(include),
                                                         include_defaults=False))
  samples = sorted(res["samples"][f"mirror_{name}"], key=lambda s: s["doc_id"])
  ours = qa.evaluate_qa(params, cfg, tok, name, limit=6, num_fewshot=2, max_len=512,
                        max_gen_toks=GEN_TOKS, progress=False)
  items = qa.load_items(name, limit=6, num_fewshot=2)
  preds = ours["predictions"]
  assert len(samples) == len(items) == len(preds) == 6
  for s, q, p in zip(samples, items, preds):
    assert s["arguments"][0][0] == q.prompt and p["question"] == q.question
    assert q.prompt.count(qa.QA_SPECS[name].template.split("{")[0]) == 3  # two shots, the question
    assert s["filtered_resps"][0] == p["prediction"]
    assert bool(s["exact_match"]) == p["correct"]
  hits = [p["correct"] for p in preds]
  assert 0 < sum(hits) < len(hits)
  assert ours["exact_match"] == pytest.approx(sum(hits) / 6)
  assert ours["exact_match"] == pytest.approx(
      res["results"][f"mirror_{name}"]["exact_match,remove_whitespace"])
  if name == "triviaqa":  # the job path: shots and item cap from the job's settings
    from minitron_jax.evaluate import run as eval_run

    job = eval_run.EvalJob("m", tasks=(), qa_task=f"{name}:6", num_fewshot=f"{name}:2",
                           progress=False)
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(qa, "MAX_GEN_TOKS", GEN_TOKS)
      got = eval_run.evaluate_params(job, params, cfg, tok)[name]
    assert got["examples"] == 6 and got["num_fewshot"] == 2
    assert [p["prediction"] for p in got["predictions"]] == [p["prediction"] for p in preds]
