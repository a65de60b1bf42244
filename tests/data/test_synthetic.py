"""Synthetic data from the teacher: unique documents, cached, readable by the data pipeline."""

import json

import jax
import pytest

from minitron_jax import config as C, model as M
from minitron_jax.data import corpus as data
from minitron_jax.evaluate import generate as G
from minitron_jax.data import synthetic


def test_synthetic_corpus_is_unique_cached_and_loadable(real_model, tmp_path, monkeypatch):
  tok = real_model[2]
  cfg = C.preset("tiny").replace(vocab_size=49152, eos_token_id=2)
  params = M.init_params(cfg, jax.random.key(0), std=0.5)
  sc = synthetic.SyntheticConfig(num_documents=6, max_new_tokens=12, batch_size=4, min_chars=5)
  path = synthetic.generate_corpus(params, cfg, tok, str(tmp_path / "syn.jsonl"), sc,
                                   model_id="tiny")
  with open(path) as f:
    rows = [json.loads(l) for l in f]
  assert len(rows) == 6
  assert len({synthetic.normalize(r["text"]) for r in rows}) == 6
  # Exchanges are stored through the teacher's chat template, as the student will be prompted.
  assert all(r["prompt"] in r["text"] and r["text"].startswith("<|im_start|>") for r in rows)
  assert len({r["prompt"] for r in rows}) > 1  # diverse seeds

  def boom(*a, **k):
    raise AssertionError("regenerated despite the cache")

  monkeypatch.setattr(G, "generate", boom)
  assert synthetic.generate_corpus(params, cfg, tok, path, sc, model_id="tiny") == path
  with pytest.raises(AssertionError, match="regenerated"):
    synthetic.generate_corpus(params, cfg, tok, path,
                              synthetic.SyntheticConfig(num_documents=7, batch_size=4),
                              model_id="tiny")
  texts = data.load_texts(path)
  assert texts == [r["text"] for r in rows]


def test_seed_prompts_are_deterministic_and_varied():
  a, b = synthetic.seed_prompts(50, 0), synthetic.seed_prompts(50, 0)
  assert a == b and len(set(a)) == 50 and synthetic.seed_prompts(50, 1) != a


def test_fact_rounds_take_their_share_and_ask_short_questions():
  for share, n in ((0.0, 0), (0.25, 25), (0.5, 50), (1.0, 100)):
    assert sum(synthetic.is_fact_round(r, share) for r in range(100)) == n
  facts = synthetic.seed_prompts(40, 0, facts=True)
  assert set(facts) <= set(synthetic.FACTS) and len(set(facts)) == 40
  assert not set(facts) & set(synthetic.seed_prompts(40, 0))


def test_the_recipe_prompts_are_never_training_prompts(monkeypatch):
  # The report's generation prompts measure what the students learned; none of them may be a
  # synthetic-data prompt, in either family.
  import os
  import sys

  monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))))
  sys.modules.pop("configs.base", None)
  from configs import base

  asked = set(base.get_config().generate.prompts)
  pool = set(synthetic.seed_prompts(10_000, 0)) | set(synthetic.seed_prompts(10_000, 0, facts=True))
  assert asked and not asked & pool
