"""Evaluation data from the Hugging Face hub, tested on local folders laid out as the hub repos.

The tests do not use the network: each repository the fallback reads is rebuilt in a
temporary folder (its file layout and column schema) from the local copies of the same items,
and loaded through the same code as the hub (``datasets.load_dataset``, given the folder instead
of the repo id). Hub examples must equal the local-file examples item for item.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
from pathlib import Path

import pytest

from minitron_jax.evaluate import sources
from minitron_jax.evaluate import tasks

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")
from helpers import offline_datasets  # noqa: E402

SPLIT_FILE = "{split}-00000-of-00001.parquet"


# ------------------------------------------------------------------ local files -> hub rows


def _lines(path: Path) -> list[str]:
  lines = path.read_text(encoding="utf-8").split("\n")
  return lines[:-1] if lines and lines[-1] == "" else lines


def _jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in _lines(path) if line.strip()]


def _winogrande_rows(root: Path) -> list[dict]:
  keys = ("sentence", "option1", "option2", "answer")
  return [{k: r[k] for k in keys} for r in _jsonl(root / "winogrande" / "dev.jsonl")]


def _piqa_rows(root: Path) -> list[dict]:
  labels = [int(x) for x in _lines(root / "piqa" / "valid-labels.lst")]
  records = _jsonl(root / "piqa" / "valid.jsonl")
  return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": y}
          for r, y in zip(records, labels, strict=True)]


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")


def _raw(text: str) -> str:
  """A raw string that the harness's one cleanup pass turns back into ``text``.

  The local file is already cleaned; text still holding markup gets the cleanup again from
  the loader, so it stays as it is. Elsewhere a double space must come from a triple one.
  """
  if "[" in text:
    return text
  assert "   " not in text
  return text.replace("  ", "   ")


def _hellaswag_rows(root: Path) -> list[dict]:
  """Split each stored ``activity: ctx`` back into ctx_a and a lower-case ctx_b, as the
  hub stores them (the harness capitalizes ctx_b)."""
  lines = _lines(root / "hellaswag" / "hellaswag_val_full.txt")
  rows = []
  for i in range(0, len(lines), 6):
    label, _, ctx = lines[i].partition(": ")
    ctx_a, ctx_b = ctx, ""
    ends = list(_SENTENCE_END.finditer(ctx))
    start = ends[-1].end() if ends else 0
    if ctx[-1] not in ".!?" and start and ctx[start:start + 1].islower():
      assert ctx[:start].endswith(" ") and not ctx[:start].endswith("  ")
      ctx_a, ctx_b = ctx[:start - 1], ctx[start:]
    endings = [_raw(e) for e in lines[i + 2:i + 6]]
    rows.append({"ind": i // 6, "activity_label": label, "ctx_a": _raw(ctx_a), "ctx_b": ctx_b,
                 "ctx": f"{ctx_a} {ctx_b}".strip(), "endings": endings, "source_id": "",
                 "split": "val", "split_type": "indomain", "label": lines[i + 1].strip()})
  return rows


def _arc_rows(path: Path) -> list[dict]:
  rows = []
  for i, r in enumerate(_jsonl(path)):
    keys = list("ABCDE"[:len(r["choices"])])
    rows.append({"id": f"q{i}", "question": r["question"],
                 "choices": {"text": r["choices"], "label": keys}, "answerKey": keys[r["answer"]]})
  return rows


def _openbookqa_rows(root: Path) -> list[dict]:
  lines = _lines(root / "openbookqa" / "test.tsv")
  header = lines[0].split("\t")
  rows = []
  for line in lines[1:]:
    row = dict(zip(header, line.split("\t")))
    parts = re.split(r"\(([A-Z])\) ", row["Choices"])
    rows.append({"id": row["ID"], "question_stem": row["Question Stem"],
                 "choices": {"text": [t.strip() for t in parts[2::2]], "label": parts[1::2]},
                 "answerKey": row["Answer Key"]})
  return rows


def _lambada_rows(root: Path) -> list[dict]:
  return [{"text": r["text"]} for r in _jsonl(root / "lambada" / "lambada_openai_test.jsonl")]


def _wikitext_rows(root: Path) -> list[dict]:
  # As the hub's rows were made: a row per line, blank lines as empty strings.
  return [{"text": line + "\n" if line.strip() else ""}
          for line in _lines(root / "wikitext-2" / "test.txt")]


def _mmlu_rows(root: Path) -> list[dict]:
  keys = ("question", "subject", "choices", "answer")
  return [{k: r[k] for k in keys} for r in _jsonl(root / "mmlu-redux" / "mmlu_redux.jsonl")]


def _mmlu_dev_rows(root: Path) -> list[dict]:
  """A stand-in dev split: five questions per subject, reworded so they differ from the
  scored ones (the layout is what is tested)."""
  rows, seen = [], {}
  for r in _mmlu_rows(root):
    seen[r["subject"]] = seen.get(r["subject"], 0) + 1
    if seen[r["subject"]] <= 5:
      rows.append({**r, "question": f"(dev) {r['question']}"})
  return rows


# The schemas of the hub datasets (their dataset cards), for the columns and types used.
_STRINGS = pa.list_(pa.string())
_CHOICES = pa.struct([("text", _STRINGS), ("label", _STRINGS)])
SCHEMAS = {
  "winogrande": pa.schema([(k, pa.string()) for k in ("sentence", "option1", "option2",
                                                      "answer")]),
  "piqa": pa.schema([("goal", pa.string()), ("sol1", pa.string()), ("sol2", pa.string()),
                     ("label", pa.int64())]),
  "hellaswag": pa.schema([("ind", pa.int32()), ("activity_label", pa.string()),
                          ("ctx_a", pa.string()), ("ctx_b", pa.string()), ("ctx", pa.string()),
                          ("endings", _STRINGS), ("source_id", pa.string()),
                          ("split", pa.string()), ("split_type", pa.string()),
                          ("label", pa.string())]),
  "arc": pa.schema([("id", pa.string()), ("question", pa.string()), ("choices", _CHOICES),
                    ("answerKey", pa.string())]),
  "openbookqa": pa.schema([("id", pa.string()), ("question_stem", pa.string()),
                           ("choices", _CHOICES), ("answerKey", pa.string())]),
  "text": pa.schema([("text", pa.string())]),
  "mmlu": pa.schema([("question", pa.string()), ("subject", pa.string()),
                     ("choices", _STRINGS), ("answer", pa.int64())]),
}


def _write_repo(repo_dir: Path, files: dict[str, tuple[str, str, str, list[dict], str]]) -> None:
  """Parquet files plus, where the hub repo has one, a README whose YAML names the configs.

  ``files`` maps a relative parquet path to (config, split, data_files glob, rows, schema key);
  a None config means the repo has no YAML and datasets infers ``data/<split>-*`` itself.
  """
  configs: dict[str, list[tuple[str, str]]] = {}
  for rel, (config, split, glob, rows, schema) in files.items():
    path = repo_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS[schema]), path)
    if config is not None:
      configs.setdefault(config, []).append((split, glob))
  if configs:
    yaml = ["---", "configs:"]
    for config, splits in configs.items():
      yaml += [f"- config_name: {config}", "  data_files:"]
      yaml += [f"  - split: {s}\n    path: {g}" for s, g in splits]
    (repo_dir / "README.md").write_text("\n".join(yaml + ["---", ""]), encoding="utf-8")


def build_hub_mirror(data_root: Path, mirror: Path) -> dict[str, tasks.HubSource]:
  """Every hub split the fallback reads, rebuilt under ``mirror/<repo id>/`` from the local
  files; returns each task's (and ``ppl``'s) source with the repo id replaced by the folder."""
  arc = {c: _arc_rows(data_root / "arc" / f"{c}-Test.gptfathom.jsonl")
         for c in ("ARC-Easy", "ARC-Challenge")}
  repos = {
    "allenai/winogrande": {SPLIT_FILE.format(split="winogrande_xl/validation"): (
        "winogrande_xl", "validation", "winogrande_xl/validation-*", _winogrande_rows(data_root),
        "winogrande")},
    "baber/piqa": {SPLIT_FILE.format(split="data/validation"): (
        None, "validation", "", _piqa_rows(data_root), "piqa")},
    "Rowan/hellaswag": {SPLIT_FILE.format(split="data/validation"): (
        "default", "validation", "data/validation-*", _hellaswag_rows(data_root), "hellaswag")},
    "allenai/ai2_arc": {SPLIT_FILE.format(split=f"{c}/test"): (
        c, "test", f"{c}/test-*", rows, "arc") for c, rows in arc.items()},
    "EleutherAI/lambada_openai": {"default/test/0000.parquet": (
        "default", "test", "default/test/*", _lambada_rows(data_root), "text")},
    "allenai/openbookqa": {SPLIT_FILE.format(split="main/test"): (
        "main", "test", "main/test-*", _openbookqa_rows(data_root), "openbookqa")},
    "cais/mmlu": {
        "all/test-00000-of-00001.parquet": ("all", "test", "all/test-*",
                                            _mmlu_rows(data_root), "mmlu"),
        "all/dev-00000-of-00001.parquet": ("all", "dev", "all/dev-*",
                                           _mmlu_dev_rows(data_root), "mmlu")},
    "Salesforce/wikitext": {SPLIT_FILE.format(split="wikitext-2-v1/test"): (
        "wikitext-2-v1", "test", "wikitext-2-v1/test-*", _wikitext_rows(data_root), "text")},
  }
  for repo, files in repos.items():
    _write_repo(mirror / repo, files)
  real = ({name: tasks.TASK_SPECS[name].hub for name in tasks.TASKS}
          | {sources.PPL: sources.WIKITEXT2})
  return {name: dataclasses.replace(src, repo=str(mirror / src.repo)) for name, src in real.items()}


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
  """No hub traffic, a private datasets cache, no env data root, no default local folder."""
  tmp = tmp_path_factory.mktemp("hub_isolated")
  with offline_datasets(tmp) as mp:
    mp.delenv(sources.DATA_ROOT_ENV, raising=False)
    mp.setattr(sources, "default_local_root", lambda: tmp / "no_default_folder")
    sources._hub_split.cache_clear()
    yield tmp
  sources._hub_split.cache_clear()


@pytest.fixture(scope="module")
def mirror_sources(isolated, data_root):
  return build_hub_mirror(Path(data_root), isolated / "hub")


@pytest.fixture
def use_mirror(mirror_sources, monkeypatch):
  """Point every task's hub source (and WikiText-2's) at the rebuilt repos."""
  for name in tasks.TASKS:
    spec = tasks.TASK_SPECS[name]
    monkeypatch.setitem(tasks.TASK_SPECS, name,
                        dataclasses.replace(spec, hub=mirror_sources[name]))
  monkeypatch.setattr(sources, "WIKITEXT2", mirror_sources[sources.PPL])
  monkeypatch.setattr(sources, "MMLU_DEV", dataclasses.replace(mirror_sources["mmlu"],
                                                               split="dev"))
  return mirror_sources


@pytest.fixture
def empty_root(tmp_path):
  (tmp_path / "empty").mkdir()
  return tmp_path / "empty"


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", tasks.TASKS)
def test_hub_examples_equal_local_examples(use_mirror, data_root, empty_root, name):
  assert sources.locate(name, empty_root) == f"hub:{use_mirror[name]}"
  hub = sources.load_examples(name, empty_root)
  local = tasks.load_task(name, data_root)
  # MMLU on the hub has no re-annotation: nothing is flagged.
  local = [dataclasses.replace(ex, flagged=False) for ex in local]
  assert len(hub) == len(local)
  for i, (h, loc) in enumerate(zip(hub, local)):
    assert h == loc, f"{name} item {i}"
  assert sources.load_examples(name, empty_root, limit=3) == local[:3]


def test_hub_mmlu_shots_come_from_the_dev_split(use_mirror, data_root, empty_root):
  """On the hub MMLU's shots are the first k dev questions of the subject (the harness's
  first_n sampler); locally the first k of the subject other than the scored one."""
  hub = sources.load_prompted("mmlu", empty_root, limit=3, num_fewshot=2)
  local = sources.load_prompted("mmlu", data_root, limit=3, num_fewshot=2)
  for h, loc in zip(hub, local):
    assert h.requests[0].context.count("(dev) ") == 2
    assert "(dev) " not in loc.requests[0].context
    assert h.requests[0].context.rsplit("\n\n", 1)[1] == loc.requests[0].context.rsplit(
        "\n\n", 1)[1]


def test_hub_ppl_text_equals_local_file(use_mirror, data_root, empty_root):
  text, where = sources.load_ppl_text(empty_root)
  assert where == f"hub:{use_mirror[sources.PPL]}"
  assert text == (Path(data_root) / sources.PPL_FILE).read_text(encoding="utf-8")


def test_hub_row_count_and_schema_match_the_harness_splits(use_mirror):
  counts = {"winogrande": 1267, "piqa": 1838, "hellaswag": 10042, "arc_easy": 2376,
            "arc_challenge": 1172, "lambada": 5153, "openbookqa": 500, sources.PPL: 4358,
            "mmlu": 5686}
  for name, n in counts.items():
    assert len(sources.load_hub(use_mirror[name])) == n, name
  assert sources.load_hub(use_mirror["hellaswag"]).features["label"].dtype == "string"


def test_explicit_root_wins(isolated, use_mirror, data_root, tmp_path, monkeypatch):
  small = tmp_path / "small"
  (small / "winogrande").mkdir(parents=True)
  src = Path(data_root) / "winogrande" / "dev.jsonl"
  (small / "winogrande" / "dev.jsonl").write_text("\n".join(_lines(src)[:4]) + "\n")
  monkeypatch.setattr(sources, "default_local_root", lambda: Path(data_root))
  assert sources.locate("winogrande", small) == f"local:{small}"
  assert len(sources.load_examples("winogrande", small)) == 4
  monkeypatch.setenv(sources.DATA_ROOT_ENV, str(small))  # the variable counts when no flag is given
  assert len(sources.load_examples("winogrande")) == 4
  # The flag beats the variable.
  assert sources.locate("winogrande", data_root) == f"local:{data_root}"


def test_local_folder_wins_over_hub(isolated, data_root, empty_root, monkeypatch):
  broken = tasks.HubSource(str(isolated / "no_such_repo"), None, "test")
  for name in tasks.TASKS:
    monkeypatch.setitem(tasks.TASK_SPECS, name,
                        dataclasses.replace(tasks.TASK_SPECS[name], hub=broken))
  monkeypatch.setattr(sources, "WIKITEXT2", broken)
  monkeypatch.setattr(sources, "default_local_root", lambda: Path(data_root))
  # An explicit folder without the task falls through to the default folder, not the hub.
  for root in (None, empty_root):
    assert sources.locate("piqa", root) == f"local:{data_root}"
    assert (sources.load_examples("piqa", root, limit=5)
            == tasks.load_task("piqa", data_root, limit=5))
    assert sources.load_ppl_text(root)[1] == str(Path(data_root) / sources.PPL_FILE)
  assert sources.check_eval_data([sources.PPL, *tasks.TASKS], empty_root, probe=pytest.fail) == []


def test_offline_without_local_copy_is_one_clear_error(isolated, empty_root, monkeypatch):
  import huggingface_hub

  # As a user would run it; the module constants are set too because they are read on import.
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  network = []  # offline mode must not even try the network

  def record(*args):
    network.append(args)
    raise OSError("no network in this test")

  monkeypatch.setattr(socket, "getaddrinfo", record)
  monkeypatch.setattr(socket.socket, "connect", record)
  with pytest.raises(sources.EvalDataError) as info:
    sources.load_examples("winogrande", empty_root)
  msg = str(info.value)
  for part in ("task 'winogrande'", str(empty_root / "winogrande" / "dev.jsonl"),
               str(isolated / "no_default_folder" / "winogrande" / "dev.jsonl"),
               "allenai/winogrande config winogrande_xl split validation", "--data_root",
               "MINITRON_JAX_DATA_ROOT"):
    assert part in msg
  assert "\n" not in msg
  with pytest.raises(sources.EvalDataError, match=r"perplexity text .*wikitext-2/test\.txt.*"
                     r"Salesforce/wikitext config wikitext-2-v1 split test"):
    sources.load_ppl_text(empty_root)
  problems = sources.check_eval_data(["ppl", "arc_easy"], empty_root)
  assert len(problems) == 2 and "offline mode" in problems[1]
  assert network == []


def test_check_eval_data_probes_each_missing_hub_split_once(isolated, empty_root, data_root):
  asked = []

  def probe(source):
    asked.append(source)
    return None if source.config == "ARC-Easy" else "no network"

  problems = sources.check_eval_data(["arc_easy", "arc_challenge", "arc_challenge", "ppl"],
                                     empty_root, probe=probe)
  assert len(asked) == 3
  assert [p.split(":")[0] for p in problems] == ["task 'arc_challenge'"] * 2 + [
      "perplexity text (WikiText-2)"]
  assert "no network" in problems[0]
  missing = str(empty_root / "nope.txt")
  assert sources.check_eval_data(["ppl"], ppl_file=missing, probe=pytest.fail) == [
      f"perplexity text (WikiText-2): {missing}: no such file (--ppl_file)"]
  assert sources.check_eval_data(["ppl"], ppl_file=Path(data_root) / sources.PPL_FILE,
                                 probe=pytest.fail) == []
  with pytest.raises(ValueError, match="unknown task 'mmlu_pro'"):
    sources.check_eval_data(["mmlu_pro"], empty_root, probe=probe)


def test_hub_problem_accepts_local_dataset_folders_and_the_datasets_cache(isolated, tmp_path):
  assert sources.hub_problem(tasks.HubSource(str(tmp_path), None, "test")) is None
  source = tasks.TASK_SPECS["winogrande"].hub
  cache = Path(datasets.config.HF_DATASETS_CACHE)
  assert not sources.in_datasets_cache(source)
  assert "offline mode" in sources.hub_problem(source)
  (cache / "allenai___winogrande" / "winogrande_xl" / "0.0.0" / "abc123").mkdir(parents=True)
  assert sources.in_datasets_cache(source)
  assert sources.hub_problem(source) is None
  assert not sources.in_datasets_cache(tasks.TASK_SPECS["arc_easy"].hub)


def test_bad_hub_row_names_the_row(isolated, tmp_path, empty_root, monkeypatch):
  rows = [{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"},
          {"sentence": "no blank", "option1": "x", "option2": "y", "answer": "2"}]
  _write_repo(tmp_path / "wg", {"v/validation-0.parquet": ("xl", "validation", "v/validation-*",
                                                            rows, "winogrande")})
  source = tasks.HubSource(str(tmp_path / "wg"), "xl", "validation")
  spec = dataclasses.replace(tasks.TASK_SPECS["winogrande"], hub=source)
  monkeypatch.setitem(tasks.TASK_SPECS, "winogrande", spec)
  with pytest.raises(ValueError, match=r"wg config xl split validation: row 1: ValueError"):
    sources.load_examples("winogrande", empty_root)
  assert len(sources.load_examples("winogrande", empty_root, limit=1)) == 1


def test_launch_scripts_report_it_as_one_line(capsys):
  from minitron_jax import errors

  msg = "task 'piqa': not found locally"

  @errors.main_wrapper
  def main(argv):
    raise sources.EvalDataError(msg)

  with pytest.raises(SystemExit) as info:
    main([])
  assert info.value.code == 1
  assert capsys.readouterr().err.splitlines() == [f"error: {msg}"]  # no traceback


def test_recipe_refuses_before_any_stage(isolated, empty_root, tmp_path, monkeypatch):
  from minitron_jax.recipe import stages

  monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
  from configs import tiny

  cfg = tiny.get_config()
  cfg.teacher, cfg.run_dir, cfg.data_root = "unused", str(tmp_path / "run"), str(empty_root)
  with pytest.raises(FileNotFoundError) as info:
    stages.run(cfg)
  lines = str(info.value).splitlines()
  assert lines[0] == "nothing was run: the recipe's input data is missing"
  # One line per evaluation task, and one for the training text (WikiText-2 valid).
  assert len(lines) == 1 + len(cfg.eval.tasks) + 1
  assert any("training data 'wikitext2'" in l and "--config.data_root" in l for l in lines)
  assert not (tmp_path / "run").exists()  # nothing ran, nothing was written
