"""Prepared shards: the same shards at any --num_proc, resuming after a kill, bad inputs refused
by name; Megatron indexed datasets written by Megatron's own writer, read token for token."""

import json
import os

import numpy as np
import pytest

from minitron_jax.data import corpus, megatron, prepare, prepared, tokens
from minitron_jax.data.prepared import DataError

WORDS = "the quick brown fox jumps over lazy dog to be or not winter of our discontent".split()


def write_corpus(path, num_docs=23, seed=0):
  rng = np.random.default_rng(seed)
  docs = [" ".join(rng.choice(WORDS, int(rng.integers(3, 60)))) for _ in range(num_docs)]
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
  return docs


def spec(source, **kw):
  return prepare.PrepareSpec(str(source), docs_per_shard=5, **kw)


def die_at_the_third_shard(monkeypatch, leave_partial):
  """`prepare.write_shard` raises KeyboardInterrupt at the third shard, after
  `leave_partial(out_dir, shard name)`; (the real write_shard, the shards written)."""
  real, written = prepare.write_shard, []

  def dies_at_the_third(out_dir, index, *a):
    if len(written) == 2:
      leave_partial(out_dir, prepared.shard_name(index))
      raise KeyboardInterrupt
    written.append(index)
    return real(out_dir, index, *a)

  monkeypatch.setattr(prepare, "write_shard", dies_at_the_third)
  return real, written


def listing(root):
  return {n: (root / n).read_bytes() for n in sorted(os.listdir(root))}


def test_num_proc_gives_the_same_shards_and_they_read_back(tmp_path, bpe_tokenizer):
  docs = write_corpus(tmp_path / "c.jsonl")
  corpus.prepare(spec(tmp_path / "c.jsonl"), tmp_path / "one", bpe_tokenizer)
  manifest = corpus.prepare(spec(tmp_path / "c.jsonl", num_proc=2), tmp_path / "two",
                            bpe_tokenizer)
  one, two = listing(tmp_path / "one"), listing(tmp_path / "two")
  assert one == two and len(manifest["shards"]) == 5 and manifest["documents"] == len(docs)
  ref = tokens.tokenize_documents(docs, bpe_tokenizer)
  # Workers get the tokenizer's `tokenizers` backend; the ids are the tokenizer's own.
  ids = bpe_tokenizer(docs, add_special_tokens=False)["input_ids"]
  assert ref.tokens.tolist() == sum((x + [bpe_tokenizer.eos_token_id] for x in ids), [])
  assert tokens.encoder(bpe_tokenizer) is not bpe_tokenizer
  src = prepared.PreparedSource(tmp_path / "two", verify=True,
                                tokenizer_fingerprint=tokens.tokenizer_fingerprint(bpe_tokenizer))
  assert np.array_equal(src.all_tokens(), ref.tokens) and manifest["tokens"] == len(ref)
  for i in (0, 4, 5, 22):  # across shard boundaries
    assert np.array_equal(src.read(i), ref.document(i))
  assert np.array_equal(src.read(7, 2, 5), ref.document(7)[2:5])
  # The training path reads a prepared directory as it is.
  assert np.array_equal(corpus.load_tokens(tmp_path / "two", bpe_tokenizer).tokens, ref.tokens)


def test_a_killed_preparation_resumes_shard_by_shard(tmp_path, bpe_tokenizer, monkeypatch):
  write_corpus(tmp_path / "c.jsonl")
  corpus.prepare(spec(tmp_path / "c.jsonl"), tmp_path / "clean", bpe_tokenizer)
  out = tmp_path / "killed"
  # What a kill leaves mid-shard: a data file, no record.
  real, written = die_at_the_third_shard(
      monkeypatch, lambda out_dir, name: (out / f"{name}.tokens").write_bytes(b"partial"))
  with pytest.raises(KeyboardInterrupt):
    corpus.prepare(spec(tmp_path / "c.jsonl"), out, bpe_tokenizer)
  assert not prepared.is_prepared(out)
  with pytest.raises(DataError, match="not a prepared dataset"):
    prepared.PreparedSource(out)
  written.clear()
  monkeypatch.setattr(prepare, "write_shard", lambda *a: written.append(a[1]) or real(*a))
  corpus.prepare(spec(tmp_path / "c.jsonl"), out, bpe_tokenizer)
  assert written == [2, 3, 4]  # shards 0 and 1 were kept
  assert listing(out) == listing(tmp_path / "clean")


def other_tokenizer():
  import tokenizers
  import transformers
  from tokenizers import models, pre_tokenizers

  tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<eos>", "<unk>",
                                                                           *WORDS])},
                                              unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_bad_inputs_are_refused_by_name(tmp_path, bpe_tokenizer):
  write_corpus(tmp_path / "c.jsonl")
  out = tmp_path / "p"
  corpus.prepare(spec(tmp_path / "c.jsonl"), out, bpe_tokenizer)
  # Another tokenizer's run refuses the shards before reading any.
  with pytest.raises(DataError, match=f"{out}: prepared with another tokenizer"):
    corpus.open_documents(out, other_tokenizer())
  # A different source into the same directory is refused, not mixed in.
  write_corpus(tmp_path / "d.jsonl", seed=1)
  with pytest.raises(DataError, match=f"{out}: holds a preparation of other input"):
    corpus.prepare(spec(tmp_path / "d.jsonl"), out, bpe_tokenizer)
  # An empty (or blank) source.
  (tmp_path / "empty.jsonl").write_text('{"text": "  "}\n')
  with pytest.raises(DataError, match="empty.jsonl: no documents"):
    corpus.prepare(spec(tmp_path / "empty.jsonl"), tmp_path / "e", bpe_tokenizer)
  # A truncated shard, named.
  shard = out / "shard-00003.tokens"
  shard.write_bytes(shard.read_bytes()[:-2])
  with pytest.raises(DataError, match="shard-00003.tokens: missing or truncated"):
    corpus.open_documents(out, bpe_tokenizer)
  # Same size, other bytes: only the checksum sees it.
  data = (out / "shard-00001.tokens").read_bytes()
  (out / "shard-00001.tokens").write_bytes(data[::-1])
  with pytest.raises(DataError, match="shard-00001.tokens: content differs"):
    prepared.PreparedSource(out, verify=True)


def test_megatron_indexed_dataset_reads_back_token_for_token(tmp_path):
  torch = pytest.importorskip("torch")
  indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset",
                                reason="megatron-core (the test extra) writes the dataset")
  rng = np.random.default_rng(0)
  docs, prefix = [], str(tmp_path / "corpus_text_document")
  for dtype in (np.uint16, np.int32):
    builder = indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    docs = []
    for d in range(40):
      if d % 7 == 3:  # a document of several sequences (sentence-split data)
        parts = [rng.integers(0, 50_000, int(rng.integers(1, 20))) for _ in range(3)]
        for p in parts:
          builder.add_item(torch.from_numpy(p.astype(np.int64)))
        builder.end_document()
        docs.append(np.concatenate(parts))
      else:
        doc = rng.integers(0, 50_000, int(rng.integers(1, 300)))
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
        docs.append(doc)
    builder.finalize(prefix + ".idx")
    src = megatron.MegatronSource(prefix, vocab_size=49_152)
    assert src.num_documents == len(docs) and src.dtype == np.dtype(dtype)
    for i, doc in enumerate(docs):
      assert np.array_equal(src.read(i), doc), i
    assert np.array_equal(src.all_tokens(), np.concatenate(docs))
    assert np.array_equal(src.read(3, 5, 9), docs[3][5:9])
  # Bad inputs, by name: a truncated .bin, a vocabulary the dtype cannot hold, a damaged .idx.
  with pytest.raises(DataError, match="int32 ids cannot hold"):
    megatron.MegatronSource(prefix, vocab_size=2**32)
  data = open(prefix + ".bin", "rb").read()
  open(prefix + ".bin", "wb").write(data[:-4])
  with pytest.raises(DataError, match="corpus_text_document.bin: missing or truncated"):
    megatron.MegatronSource(prefix)
  idx = open(prefix + ".idx", "rb").read()
  open(prefix + ".idx", "wb").write(idx[:-8])
  with pytest.raises(DataError, match="corpus_text_document.idx: .* truncated or damaged"):
    megatron.MegatronSource(prefix)


def test_object_store_paths_read_through_tensorstore(tmp_path, bpe_tokenizer):
  # A file:// URL takes the gs:// code path: tensorstore's key-value store, byte ranges.
  docs = write_corpus(tmp_path / "c.jsonl")
  corpus.prepare(spec(tmp_path / "c.jsonl"), tmp_path / "p", bpe_tokenizer)
  url = "file://" + str(tmp_path / "p")
  src = corpus.open_documents(url, bpe_tokenizer)
  assert isinstance(src, prepared.PreparedSource) and src._tokens[0]._kv is not None
  ref = tokens.tokenize_documents(docs, bpe_tokenizer)
  assert np.array_equal(src.read(6, 1, 4), ref.document(6)[1:4])
  assert np.array_equal(src.all_tokens(), ref.tokens)
  shard = tmp_path / "p" / "shard-00002.offsets"
  shard.write_bytes(shard.read_bytes()[:-8])
  with pytest.raises(DataError, match="shard-00002.offsets: missing or truncated"):
    prepared.PreparedSource(url)


def test_a_streamed_hub_dataset_prepares_like_its_text(tmp_path, bpe_tokenizer, monkeypatch):
  import datasets

  docs = write_corpus(tmp_path / "c.jsonl")
  calls = []

  def load(repo, config, split, streaming=False):
    calls.append((repo, config, split, streaming))
    return datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset()

  monkeypatch.setattr(datasets, "load_dataset", load)
  m = corpus.prepare(spec("org/web:cfg", streaming=True), tmp_path / "hub", bpe_tokenizer)
  assert calls == [("org/web", "cfg", "train", True)] and m["documents"] == len(docs)
  corpus.prepare(spec(tmp_path / "c.jsonl"), tmp_path / "local", bpe_tokenizer)
  shards = [n for n in os.listdir(tmp_path / "local") if n.startswith("shard-")]
  for n in shards:
    assert (tmp_path / "hub" / n).read_bytes() == (tmp_path / "local" / n).read_bytes()


def test_the_launch_script_refuses_an_empty_source_in_one_line(tmp_path, bpe_tokenizer):
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  bpe_tokenizer.save_pretrained(tmp_path / "tok")
  (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
  r = subprocess.run([sys.executable, os.path.join(root, "launch", "prepare_data.py"),
                      f"--source={tmp_path / 'empty.jsonl'}", f"--output_dir={tmp_path / 'out'}",
                      f"--tokenizer={tmp_path / 'tok'}"], capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert "error: " + str(tmp_path / "empty.jsonl") + ": no documents" in r.stderr
  assert not prepared.is_prepared(tmp_path / "out")


def test_a_preparation_writes_to_an_object_store_and_resumes_there(tmp_path, bpe_tokenizer,
                                                                    monkeypatch):
  # A file:// URL takes the gs:// code path: every write is one put through tensorstore's
  # key-value store, every check a read of it.
  from minitron_jax.data import blob, pipeline

  write_corpus(tmp_path / "c.jsonl")
  corpus.prepare(spec(tmp_path / "c.jsonl"), tmp_path / "clean", bpe_tokenizer)
  url = "file://" + str(tmp_path / "bucket" / "prepared")
  puts = []
  real_put = blob.write_bytes
  monkeypatch.setattr(blob, "write_bytes", lambda p, d: puts.append(p) or real_put(p, d))

  # What a kill leaves mid-shard: a data object, no record.
  real, written = die_at_the_third_shard(
      monkeypatch, lambda out_dir, name: blob.write_bytes(f"{out_dir}/{name}.tokens", b"partial"))
  with pytest.raises(KeyboardInterrupt):
    corpus.prepare(spec(tmp_path / "c.jsonl"), url, bpe_tokenizer)
  assert not prepared.is_prepared(url)
  with pytest.raises(DataError, match="not a prepared dataset"):
    corpus.open_documents(url, bpe_tokenizer)
  written.clear()
  monkeypatch.setattr(prepare, "write_shard", lambda *a: written.append(a[1]) or real(*a))
  manifest = corpus.prepare(spec(tmp_path / "c.jsonl"), url, bpe_tokenizer)
  assert written == [2, 3, 4]  # shards 0 and 1 were kept
  assert all(p.startswith(url + "/") for p in puts) and puts[-1] == url + "/manifest.json"
  assert listing(tmp_path / "bucket" / "prepared") == listing(tmp_path / "clean")
  assert json.loads(json.dumps(manifest)) == prepared.read_manifest(url)
  # Read back through the loader: the rows of the local copy.
  kw = dict(seq_len=16, global_batch_size=4, seed=1)
  remote = pipeline.Loader([corpus.open_documents(url, bpe_tokenizer, verify=True)], **kw)
  local = pipeline.Loader([corpus.open_documents(tmp_path / "clean", bpe_tokenizer)], **kw)
  for _ in range(3):
    assert np.array_equal(next(remote)["tokens"], next(local)["tokens"])
