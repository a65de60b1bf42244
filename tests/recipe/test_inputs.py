"""The recipe checks its training data before any stage runs."""

from pathlib import Path

import pytest

from minitron_jax.recipe import stages


@pytest.fixture
def cfg(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
  from configs import tiny

  c = tiny.get_config()
  c.data_root = str(tmp_path / "root")
  return c


def test_local_wikitext_needs_no_hub(cfg, tmp_path):
  valid = tmp_path / "root" / "wikitext-2" / "valid.txt"
  valid.parent.mkdir(parents=True)
  valid.write_text(" = Title = \n text \n")
  cfg.data.source = ("wikitext2",)
  asked = []
  assert stages.training_data_problems(cfg, probe=lambda s: asked.append(s) or "down") == []
  assert asked == []  # a local copy costs no network


def test_each_missing_source_is_named_with_the_fix(cfg, tmp_path):
  text = tmp_path / "corpus.txt"
  text.write_text("hello")
  cfg.data.source = ("wikitext2", str(text), str(tmp_path / "missing.txt"), "org/some_data",
                     "synthetic", "shakespeare")
  asked = []

  def probe(source):
    asked.append((source.repo, source.config, source.split))
    return "no network"

  problems = stages.training_data_problems(cfg, probe=probe)
  assert asked == [("Salesforce/wikitext", "wikitext-2-v1", "validation"),
                   ("org/some_data", None, "train")]
  assert len(problems) == 3
  assert "'wikitext2'" in problems[0] and "valid.txt is missing" in problems[0]
  assert "missing.txt" in problems[1]
  assert "'org/some_data'" in problems[2] and "no network" in problems[2]
  assert all("--config.data.source" in p for p in problems)


def test_reachable_hub_sources_pass(cfg):
  cfg.data.source = ("wikitext2", "org/some_data:cfg")
  assert stages.training_data_problems(cfg, probe=lambda s: None) == []


def test_evaluation_data_names_protocol_tasks_and_the_qa_task(cfg, tmp_path):
  """With no local data and the hub unreachable, the protocol's tasks and the QA task are
  each refused by name before any stage runs."""
  from minitron_jax.evaluate import sources

  (tmp_path / "root").mkdir()
  cfg.eval.tasks = ("ppl",)
  cfg.eval.ppl_file = ""
  cfg.eval.protocol = "minitron"
  cfg.eval.qa_task = "triviaqa:50"
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sources, "default_local_root", lambda: tmp_path / "none")
    mp.delenv(sources.DATA_ROOT_ENV, raising=False)
    problems = stages.evaluation_data_problems(cfg, probe=lambda s: "offline")
    mp.setattr(sources, "hub_problem", lambda s, timeout=10.0: "offline")
    with pytest.raises(FileNotFoundError, match="nothing was run") as err:
      stages._check_inputs(cfg, ["evaluate"])
  named = " ".join(problems)
  for task in ("mmlu", "winogrande", "arc_challenge", "hellaswag", "'triviaqa'"):
    assert task in named, task
  assert "mandarjoshi/trivia_qa" in str(err.value) and "cais/mmlu" in str(err.value)
  cfg.eval.qa_task = ""
  cfg.eval.protocol = "zero_shot"
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sources, "default_local_root", lambda: tmp_path / "none")
    mp.delenv(sources.DATA_ROOT_ENV, raising=False)
    assert len(stages.evaluation_data_problems(cfg, probe=lambda s: "offline")) == 1  # ppl


@pytest.mark.parametrize("config", ["tiny", "base", "smollm2_135m", "gemma3_270m",
                                    "llama31_8b_to_4b_width", "llama31_8b_to_4b_depth"])
def test_every_stage_reads_only_what_an_earlier_stage_makes(config, tmp_path, monkeypatch):
  """With every optional stage on, each stage's inputs are outputs of a stage before it: the
  whole recipe passes the order check on an empty run directory."""
  import importlib

  monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
  c = importlib.import_module(f"configs.{config}").get_config()
  c.data.source = ("wikitext2", "synthetic")
  c.data.weights = ()
  c.baselines = True
  c.prune.search.enabled = True
  c.sparsify.pattern = "2:4"
  c.sparsify.source = c.quantize.source  # a student the config makes
  c.distill.teacher_topk = 16
  for steps in (0, 1):
    c.correction.steps = steps
    chosen = stages._selected(c, None)
    stages._check_order(c, str(tmp_path), chosen, [s.name for s in chosen])
    prune = next(s for s in chosen if s.name.startswith("prune_"))
    assert ("corrected/run.json" in prune.inputs(c)) == bool(steps)


def _refusal(cfg, tmp_path, only):
  cfg.run_dir = str(tmp_path / "run")
  with pytest.raises(FileNotFoundError, match="nothing was run") as err:
    stages.run(cfg, only=only)
  assert not (tmp_path / "run").exists()  # refused before anything was written
  return str(err.value)


def test_a_stage_whose_producer_is_not_selected_is_refused_by_name(cfg, tmp_path):
  cfg.data.source = ("wikitext2", "synthetic")
  msg = _refusal(cfg, tmp_path, ("fetch", "data"))
  assert "stage 'data' needs" in msg and "synthetic.jsonl" in msg
  assert "'synthetic_data'" in msg and "teacher.json" not in msg  # fetch runs before it
  msg = _refusal(cfg, tmp_path, ("quantize",))
  assert "stage 'quantize'" in msg and "distill_depth/run.json" in msg
  assert "'distill_depth'" in msg
  cfg.sparsify.pattern = "2:4"
  cfg.sparsify.source = "pruned_width"
  msg = _refusal(cfg, tmp_path, ("sparsify",))
  assert "pruned_width/prune_report.json" in msg and "'data'" in msg  # sparsegpt calibrates
  cfg.sparsify.method = "magnitude"
  assert "'data'" not in _refusal(cfg, tmp_path, ("sparsify",))
  msg = _refusal(cfg, tmp_path, ("distill_width",))
  for producer in ("'prune_width'", "'teacher_correction'", "'teacher_logits'", "'data'"):
    assert producer in msg, producer


def test_outputs_already_in_the_run_directory_satisfy_a_stage(cfg, tmp_path):
  """Resuming one stage of an earlier run: its inputs on disk are enough."""
  cfg.data.source = ("wikitext2", "synthetic")
  run = tmp_path / "run"
  chosen = [s for s in stages.stages() if s.name == "data"]
  with pytest.raises(FileNotFoundError, match="synthetic_data"):
    stages._check_order(cfg, str(run), chosen, ["data"])
  (run / "data").mkdir(parents=True)
  (run / "data" / "synthetic.jsonl").write_text("")
  stages._check_order(cfg, str(run), chosen, ["data"])
  stages._check_order(cfg, str(tmp_path / "elsewhere"), chosen, [])  # done already: not run
