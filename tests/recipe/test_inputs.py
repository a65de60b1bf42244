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
