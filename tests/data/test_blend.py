"""Blends of training sources: the recipe's `data.source` mixes text, prepared directories and
Megatron datasets through one blend file and one loader, checked by name before any stage."""

import dataclasses
import json
import os

import numpy as np
import pytest

from minitron_jax.data import blend, corpus, megatron, pipeline, prepare, prepared
from minitron_jax.data.prepared import DataError
from minitron_jax.settings import SettingError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EOS = 1  # the test tokenizer's <eos>


def prepared_dir(tmp_path, tok):
  """A prepared directory of digits-only text: (path, the ids it uses)."""
  docs = tmp_path / "digits"
  docs.mkdir()
  for i in range(30):
    (docs / f"{i:02d}.txt").write_text(" ".join(str(97 * i + j) for j in range(i % 11 + 3)))
  out = tmp_path / "prepared"
  corpus.prepare(prepare.PrepareSpec(str(docs), docs_per_shard=8), out, tok)
  return str(out), set(np.unique(prepared.PreparedSource(out).all_tokens()).tolist())


def megatron_prefix(tmp_path, ids):
  """A Megatron dataset written by megatron-core, its documents drawn from `ids`, EOS last."""
  torch = pytest.importorskip("torch")
  indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset",
                                reason="megatron-core (the test extra) writes the dataset")
  prefix = str(tmp_path / "corpus_text_document")
  rng = np.random.default_rng(0)
  builder = indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
  for _ in range(40):
    doc = np.append(rng.choice(ids, int(rng.integers(2, 30))), EOS)
    builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
  builder.finalize(prefix + ".idx")
  return prefix


@pytest.fixture
def recipe_cfg(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(ROOT)
  from configs import tiny

  cfg = tiny.get_config()
  cfg.run_dir = str(tmp_path / "run")
  return cfg


def test_the_recipe_blends_prepared_and_megatron_sources_as_distill_reads_them(
    tmp_path, bpe_tokenizer, recipe_cfg):
  from minitron_jax.distill import job as distill_job, run as distill_run
  from minitron_jax.distill.step import TrainConfig
  from minitron_jax.recipe import jobs, stages

  prep, digit_ids = prepared_dir(tmp_path, bpe_tokenizer)
  prefix = megatron_prefix(tmp_path, sorted(set(range(2, 400)) - digit_ids))
  text = tmp_path / "notes.txt"
  text.write_text("\n\n".join(f"Paragraph {i} about the stage. " * 9 for i in range(60)))
  cfg, run_dir = recipe_cfg, recipe_cfg.run_dir
  cfg.data.source, cfg.data.weights = (str(text), prep, prefix), (0.2, 0.56, 0.24)
  cfg.data.heldout_chars = 100
  assert stages.training_data_problems(cfg, tokenizer=lambda: bpe_tokenizer) == []
  jobs.check_recipe(cfg)
  stages.stage_data(cfg, run_dir)
  # One blend file: the mixed text, then the token sources as they are; every stage reads it.
  path = os.path.join(run_dir, "data", "blend.json")
  assert [(e.source, e.weight) for e in blend.read(path)] == [
      (os.path.join(run_dir, "data", "train.jsonl"), 0.2), (prep, 0.56), (prefix, 0.24)]
  job = jobs.distill_job(cfg, run_dir, "distill_width")
  assert job.data == path == jobs.prune_job(cfg, run_dir, "width").calib.data
  # Batches of the prepared + Megatron blend, as the recipe's job reads them and as
  # `launch/distill.py --data=<a blend file>` does (the same job field), and as two sources
  # given straight to the loader.
  cfg.data.source, cfg.data.weights = (prep, prefix), (0.7, 0.3)
  stages.stage_data(cfg, run_dir)
  mine = tmp_path / "mine.blend.json"
  mine.write_text(json.dumps({"format": blend.FORMAT, "version": 1, "sources": [
      {"source": "prepared", "weight": 7}, {"source": "corpus_text_document", "weight": 3}]}))
  train = TrainConfig(seq_len=16, global_batch_size=8, seed=3)
  kw = dict(seq_len=16, global_batch_size=8, seed=3)
  loaders = [pipeline.training_loader(distill_run._training_tokens(
      distill_job.DistillJob(data=d, train=train), bpe_tokenizer)[0], **kw)
      for d in (jobs.distill_job(cfg, run_dir, "distill_width").data, str(mine))]
  loaders.append(pipeline.Loader([prepared.PreparedSource(prep),
                                  megatron.MegatronSource(prefix)], weights=[0.7, 0.3], **kw))
  rows = []
  for _ in range(60):
    batches = [next(loader)["tokens"] for loader in loaders]
    assert all(np.array_equal(b, batches[0]) for b in batches[1:])
    rows.append(batches[0])
  rows = np.concatenate(rows)
  from_prep = np.array([set(r[r > EOS].tolist()) <= digit_ids for r in rows])
  assert not any(set(r[r > EOS].tolist()) & digit_ids for r in rows[~from_prep])
  n, p = len(rows), 0.7
  assert abs(from_prep.mean() - p) < 3 * np.sqrt(p * (1 - p) / n)
  # Calibration reads a blend as its sources' documents one after the other.
  stream = corpus.load_tokens(str(mine), bpe_tokenizer)
  assert np.array_equal(stream.tokens, np.concatenate([
      prepared.PreparedSource(prep).all_tokens(), megatron.MegatronSource(prefix).all_tokens()]))
  assert stream.num_documents == 30 + 40
  # Without eval data, the held-out tokens are the first source's tail; the weights stay.
  held_job = distill_job.DistillJob(data=str(mine), train=dataclasses.replace(
      train, eval_every=1, eval_windows=2))
  docs, held = distill_run._training_tokens(held_job, bpe_tokenizer)
  full = prepared.PreparedSource(prep).all_tokens()
  assert docs.weights == [0.7, 0.3] and len(held) >= 32
  assert np.array_equal(held, full[len(full) - len(held):])
  assert len(corpus.to_stream(docs.parts[0])) == len(full) - len(held)


def test_bad_blends_are_refused_by_name_before_any_stage(tmp_path, bpe_tokenizer, recipe_cfg):
  import tokenizers
  import transformers
  from minitron_jax.recipe import jobs, stages

  words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<eos>": 0, "<unk>": 1, "a": 2},
                                                           unk_token="<unk>"))
  other = transformers.PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>")
  prep, digit_ids = prepared_dir(tmp_path, bpe_tokenizer)
  prefix = megatron_prefix(tmp_path, sorted(digit_ids))
  cfg = recipe_cfg
  missing = str(tmp_path / "nowhere_text_document")
  open(missing + ".bin", "wb").close()  # a .bin without its index
  cfg.data.source = (prep, prefix, missing, str(tmp_path / "gone") + "/")
  cfg.data.weights = (1.0, 1.0, 1.0, 1.0)
  (tmp_path / "gone").mkdir()
  (tmp_path / "gone" / prepare.SETTINGS).write_text("{}")  # an interrupted preparation
  problems = stages.training_data_problems(cfg, tokenizer=lambda: other)
  assert len(problems) == 3, problems
  assert "prepared" in problems[0] and "another tokenizer" in problems[0]
  assert "nowhere_text_document.idx: missing" in problems[1]
  assert "gone" in problems[2] and "interrupted" in problems[2]
  cfg.data.weights = (1.0, 0.0, 1.0, 1.0)
  with pytest.raises(SettingError, match=r"^data.weights: every weight must be positive"):
    jobs.check_recipe(cfg)
  cfg.data.weights = (1.0, 1.0)
  with pytest.raises(SettingError, match=r"^data.weights=\(1.0, 1.0\) has 2 entries"):
    jobs.check_recipe(cfg)
  # A blend file itself: a weight <= 0, or a blend naming a blend.
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"format": blend.FORMAT, "version": 1,
                             "sources": [{"source": prep, "weight": -1}]}))
  with pytest.raises(DataError, match="bad.json: source .* has weight -1.0"):
    corpus.open_documents(bad, bpe_tokenizer)
  bad.write_text(json.dumps({"format": blend.FORMAT, "version": 1,
                             "sources": [{"source": str(bad)}]}))
  with pytest.raises(DataError, match="cannot name another blend"):
    corpus.open_documents(bad, bpe_tokenizer)
