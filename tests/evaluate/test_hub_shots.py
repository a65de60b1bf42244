"""Few-shot prompts of hub tasks draw their shots from the hub's train split as
lm-evaluation-harness does: lm-eval's own task YAMLs (pointed at local folders laid out as the
hub repositories) build the requests, and ours must equal them request for request.

WinoGrande and HellaSwag score their validation split (the harness leaves the scored item
out, drawing k + 1); ARC scores its test split (k drawn). The rows are synthetic.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from minitron_jax.evaluate import sources, tasks

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

_WORDS = "cat dog tree river stone house light rain glass paper metal cloud".split()
_STR = pa.string()
SCHEMAS = {
  "winogrande": pa.schema([(k, _STR) for k in ("sentence", "option1", "option2", "answer")]),
  "arc_easy": pa.schema([("id", _STR), ("question", _STR),
                         ("choices", pa.struct([("text", pa.list_(_STR)),
                                                ("label", pa.list_(_STR))])),
                         ("answerKey", _STR)]),
  "hellaswag": pa.schema([("ind", pa.int32()), ("activity_label", _STR), ("ctx_a", _STR),
                          ("ctx_b", _STR), ("ctx", _STR), ("endings", pa.list_(_STR)),
                          ("source_id", _STR), ("split", _STR), ("split_type", _STR),
                          ("label", _STR)]),
}
YAMLS = {"winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml",
         "hellaswag": "hellaswag/hellaswag.yaml"}


def _words(rnd, n):
  return " ".join(rnd.choice(_WORDS) for _ in range(n))


def _row(name: str, rnd: random.Random, i: int) -> dict:
  if name == "winogrande":
    return {"sentence": f"The {_words(rnd, 2)} _ {_words(rnd, 3)}.", "option1": rnd.choice(_WORDS),
            "option2": rnd.choice(_WORDS), "answer": rnd.choice("12")}
  if name == "arc_easy":
    labels = list("ABCD")
    return {"id": f"q{i}", "question": f"Which {_words(rnd, 3)}?",
            "choices": {"text": [_words(rnd, 2) for _ in labels], "label": labels},
            "answerKey": rnd.choice(labels)}
  ctx_a = f"A {_words(rnd, 3)}."
  ctx_b = f"the {_words(rnd, 2)}"
  return {"ind": i, "activity_label": _words(rnd, 1).title(), "ctx_a": ctx_a, "ctx_b": ctx_b,
          "ctx": f"{ctx_a} {ctx_b}", "endings": [_words(rnd, 3) for _ in range(4)],
          "source_id": f"s{i}", "split": "val", "split_type": "indomain",
          "label": str(rnd.randrange(4))}


def _mirror(root: Path, name: str) -> Path:
  """train and the scored split under data/ (datasets infers the splits from the names)."""
  repo = root / name
  rnd = random.Random(len(name))
  scored = tasks.TASK_SPECS[name].hub.split
  for split, n in (("train", 30), (scored, 8)):
    path = repo / "data" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([_row(name, rnd, i) for i in range(n)],
                                        schema=SCHEMAS[name]), path)
  return repo


@pytest.fixture
def isolated(tmp_path, monkeypatch):
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(sources, "default_local_root", lambda: tmp_path / "no_local")
  monkeypatch.delenv(sources.DATA_ROOT_ENV, raising=False)
  sources._hub_split.cache_clear()
  yield tmp_path
  sources._hub_split.cache_clear()


@pytest.mark.parametrize("name", list(YAMLS))
def test_hub_shots_come_from_train_as_the_harness_draws_them(isolated, monkeypatch, name):
  lm_eval = pytest.importorskip("lm_eval")
  from lm_eval.tasks import TaskManager, get_task_dict

  repo = _mirror(isolated, name)
  spec = tasks.TASK_SPECS[name]
  monkeypatch.setitem(tasks.TASK_SPECS, name, dataclasses.replace(
      spec, hub=dataclasses.replace(spec.hub, repo=str(repo), config=None),
      train=dataclasses.replace(spec.train, repo=str(repo), config=None)))
  own = Path(lm_eval.__file__).parent / "tasks" / YAMLS[name]
  include = isolated / "yaml"
  include.mkdir()
  (include / f"mirror_{name}.yaml").write_text(
      f"include: {own}\ntask: mirror_{name}\ndataset_path: {repo}\ndataset_name: null\n",
      encoding="utf-8")
  task = get_task_dict([f"mirror_{name}"],
                       TaskManager(include_path=str(include), include_defaults=False))
  task = task[f"mirror_{name}"]
  task.set_config(key="num_fewshot", value=3)
  task.set_fewshot_seed(seed=1234)
  task.build_all_requests(limit=5)
  theirs: dict[int, list] = {}
  for inst in sorted(task.instances, key=lambda x: (x.doc_id, x.idx)):
    theirs.setdefault(inst.doc_id, []).append(tuple(inst.arguments))
  ours = sources.load_prompted(name, limit=5, num_fewshot=3)
  assert len(ours) == len(theirs) == 5
  for i, ex in enumerate(ours):
    assert [(r.context, r.continuation) for r in ex.requests] == theirs[i], (name, i)
