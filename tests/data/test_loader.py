"""The Grain training pipeline: packing with segment ids, per-epoch shuffle, per-process rows,
resume from the checkpointed state, weighted blending."""

import json
import os

import jax
import numpy as np
import pytest

from minitron_jax import config as C, model as M
from minitron_jax.data import pipeline, tokens

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def random_stream(seed, num_docs, max_len, vocab=256, low=3):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, max_len + 1, num_docs)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  return tokens.TokenStream(rng.integers(low, vocab, offsets[-1]).astype(np.int32), offsets)


def packed(stream, **kw):
  kw = {"seq_len": 32, "global_batch_size": 4, "process_index": 0, "process_count": 1, **kw}
  streams = stream if isinstance(stream, list) else [stream]
  return pipeline.Loader(streams, **kw)


def segments(row):
  """(segment id, tokens, positions) of each segment of a packed row, in row order."""
  seg = row["segment_ids"]
  return [(s, row["tokens"][seg == s], row["positions"][seg == s]) for s in np.unique(seg) if s]


def test_packing_covers_every_token_once_within_segments():
  stream = random_stream(0, num_docs=60, max_len=80)  # many docs longer than a row
  ds = packed(stream, seq_len=32).sources[0]
  pieces = {}
  for r in range(ds.num_rows):
    row = ds[r]
    seg = row["segment_ids"]
    real = seg > 0
    assert real[:real.sum()].all()  # padding only at the end
    assert (row["tokens"][~real] == 0).all() and (row["positions"][~real] == 0).all()
    assert np.array_equal(np.unique(seg[real]), np.arange(1, seg.max() + 1))
    for _, toks, pos in segments(row):
      assert np.array_equal(pos, np.arange(len(toks)))
      pieces.setdefault(len(toks), []).append(toks)
  # Reassemble: each document is its full pieces of 32 then one remainder, all found once.
  pool = [tuple(p) for ps in pieces.values() for p in ps]
  for i in range(stream.num_documents):
    doc = stream.document(i)
    for s in range(0, len(doc), 32):
      pool.remove(tuple(doc[s:s + 32]))
  assert pool == []
  assert ds.padding_fraction < 0.1


def test_one_epoch_of_batches_is_every_row_once():
  ds = packed(random_stream(1, num_docs=40, max_len=50), global_batch_size=3)
  n = ds.num_rows[0]
  rows = [tuple(r) for _ in range(-(-n // 3)) for r in next(ds)["tokens"]]
  # Epoch 0 in the order of the permutation seeded with (seed, epoch).
  order = np.random.default_rng((0, 0)).permutation(n)
  assert rows[:n] == [tuple(ds.sources[0][r]["tokens"]) for r in order]
  assert ds.state()["position"] == 3 * -(-n // 3)


def test_packed_row_matches_documents_run_separately():
  cfg = C.preset("tiny")
  params = jax.jit(M.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
  forward = jax.jit(lambda t, pos=None, seg=None: M.forward(
      params, cfg, t, positions_bt=pos, segment_ids_bt=seg)["logits"])
  stream = random_stream(2, num_docs=5, max_len=14)
  row = packed(stream, seq_len=64).sources[0][0]
  assert len(segments(row)) == 5 and (row["segment_ids"] == 0).any()
  logits = forward(row["tokens"][None], row["positions"][None], row["segment_ids"][None])[0]
  # Each document alone, as a causal row padded at the end (padding cannot reach back).
  docs = segments(row)
  alone_bt = np.zeros((len(docs), max(len(t) for _, t, _ in docs)), np.int32)
  for i, (_, toks, _) in enumerate(docs):
    alone_bt[i, :len(toks)] = toks
  alone = forward(alone_bt)
  for i, (s, toks, _) in enumerate(docs):
    np.testing.assert_allclose(logits[row["segment_ids"] == s], alone[i, :len(toks)], atol=1e-5,
                               rtol=0)


def test_resume_gives_the_same_batches_across_epochs():
  stream = random_stream(3, num_docs=30, max_len=40)
  ref = packed(stream, global_batch_size=4, seed=5)
  n = ref.num_rows[0]
  assert n % 4  # so batches straddle epoch boundaries
  expected = [next(ref) for _ in range(3 * n // 4 + 2)]
  for k in (0, 2, n // 4, len(expected) - 3):
    it = packed(stream, global_batch_size=4, seed=5)
    for _ in range(k):
      next(it)
    saved = json.loads(json.dumps(it.state()))
    resumed = packed(stream, global_batch_size=4, seed=5, state=saved)
    for want in expected[k:]:
      got = next(resumed)
      for key in ("tokens", "segment_ids", "positions"):
        assert np.array_equal(got[key], want[key]), (k, key)
  rows = np.concatenate([b["tokens"] for b in expected])
  assert not np.array_equal(rows[:n], rows[n:2 * n])  # epoch 1 is reshuffled ...
  assert sorted(map(tuple, rows[:n])) == sorted(map(tuple, rows[n:2 * n]))  # ... the same rows
  # The state is a row position, so a run may resume with another batch size.
  state = {**saved, "position": 8}
  assert np.array_equal(next(packed(stream, global_batch_size=2, seed=5, state=state))["tokens"],
                        rows[8:10])
  with pytest.raises(ValueError, match="saved with seed=5"):
    packed(stream, global_batch_size=4, seed=6).restore(saved)


def test_hosts_together_produce_the_global_batch():
  stream = random_stream(4, num_docs=30, max_len=40)
  single = packed(stream, global_batch_size=6)
  hosts = [packed(stream, global_batch_size=6, process_index=i, process_count=2) for i in (0, 1)]
  for _ in range(5):
    want = next(single)
    local = [next(h) for h in hosts]
    assert local[0]["tokens"].shape == (3, 32)
    for key in want:
      assert np.array_equal(np.concatenate([b[key] for b in local]), want[key])
  assert hosts[0].state() == hosts[1].state() == single.state()
  with pytest.raises(ValueError, match="not divisible by process_count=4"):
    packed(stream, global_batch_size=6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="process_index=2"):
    packed(stream, global_batch_size=6, process_index=2, process_count=2)


def test_blending_weights_hold_within_sampling_error():
  # Disjoint id ranges tell the sources apart; rows are whole rows of one source.
  a = random_stream(5, num_docs=50, max_len=40, vocab=100)
  b = random_stream(6, num_docs=80, max_len=40, vocab=300, low=200)
  ds = packed([a, b], weights=[3.0, 1.0], global_batch_size=8, seed=1)
  rows = np.concatenate([next(ds)["tokens"] for _ in range(100)])
  from_a = np.array([(r[r > 0] < 100).all() for r in rows])
  assert np.array_equal(from_a, ~np.array([(r[r > 0] >= 200).all() for r in rows]))
  n, p = len(rows), 0.75
  assert abs(from_a.mean() - p) < 3 * np.sqrt(p * (1 - p) / n)
  # Each source still cycles through all its rows, reshuffled per epoch.
  a_rows = [tuple(r) for r in rows[from_a]]
  m = ds.num_rows[0]
  assert sorted(a_rows[:m]) == sorted(tuple(ds.sources[0][r]["tokens"]) for r in range(m))
  with pytest.raises(ValueError, match="one positive weight per source"):
    packed([a, b], weights=[1.0])
  state = ds.state()
  with pytest.raises(ValueError, match="saved with weights"):
    packed([a, b], weights=[1.0, 1.0], global_batch_size=8, seed=1, state=state)


def test_reader_threads_give_the_same_batches():
  stream = random_stream(7, num_docs=40, max_len=40)
  plain, threaded = packed(stream, seed=2), packed(stream, seed=2, num_threads=2)
  for _ in range(6):
    want, got = next(plain), next(threaded)
    assert all(np.array_equal(want[k], got[k]) for k in want)


_READER = """
import sys, numpy as np
from minitron_jax.data import prepared, pipeline
src = prepared.PreparedSource(sys.argv[1])
loader = pipeline.Loader([src], seq_len=16, global_batch_size=6, seed=3,
                         process_index=int(sys.argv[2]), process_count=int(sys.argv[3]))
np.save(sys.argv[4], np.stack([next(loader)["tokens"] for _ in range(4)]))
"""


def test_two_processes_read_disjoint_rows_whose_union_is_the_global_batch(tmp_path,
                                                                          bpe_tokenizer):
  import subprocess
  import sys

  from minitron_jax.data import corpus, prepare

  docs = tmp_path / "docs"
  docs.mkdir()
  for i in range(40):  # distinct text, so distinct rows (within the first epoch read here)
    (docs / f"{i:02d}.txt").write_text(" ".join(str(1000 * i + j) for j in range(i % 9 + 4)))
  out = tmp_path / "prepared"
  corpus.prepare(prepare.PrepareSpec(str(docs), docs_per_shard=8), out, bpe_tokenizer)
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  runs = [(str(out), str(i), str(n), str(tmp_path / f"rows{i}{n}.npy")) for i, n in
          ((0, 2), (1, 2), (0, 1))]
  procs = [subprocess.Popen([sys.executable, "-c", _READER, *r], env=env) for r in runs]
  assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
  p0, p1, whole = (np.load(r[3]) for r in runs)  # (batches, local rows, seq_len)
  assert p0.shape == p1.shape == (4, 3, 16) and whole.shape == (4, 6, 16)
  assert np.array_equal(np.concatenate([p0, p1], 1), whole)  # the union, in order
  mine = {tuple(r) for r in p0.reshape(-1, 16)}
  assert not mine & {tuple(r) for r in p1.reshape(-1, 16)}  # no row read twice


def test_worker_processes_give_the_same_batches_and_resume(tmp_path, bpe_tokenizer):
  # A prepared source: workers get it by path (its memory maps reopen in each process).
  from minitron_jax.data import corpus, prepare

  docs = tmp_path / "docs"
  docs.mkdir()
  for i in range(30):
    (docs / f"{i:02d}.txt").write_text(" ".join(str(1000 * i + j) for j in range(i % 7 + 3)))
  corpus.prepare(prepare.PrepareSpec(str(docs), docs_per_shard=8), tmp_path / "p", bpe_tokenizer)
  src = corpus.open_documents(tmp_path / "p", bpe_tokenizer)
  kw = dict(seq_len=16, global_batch_size=4, seed=4, process_index=1, process_count=2)
  plain = pipeline.Loader([src], **kw)
  want = [next(plain) for _ in range(10)]
  # Resumed mid-stream from a state saved without workers; one start of the workers (each
  # imports Grain, hence JAX: seconds).
  saved = json.loads(json.dumps(pipeline.Loader([src], **kw).state() | {"position": 3 * 4}))
  with pipeline.Loader([src], num_workers=2, state=saved, **kw) as workers:
    got = [next(workers) for _ in range(5)]  # batches 3..7, prefetching beyond them
    after = json.loads(json.dumps(workers.state()))
  got.append(next(pipeline.Loader([src], state=after, **kw)))
  for w, g in zip(want[3:9], got, strict=True):
    assert all(np.array_equal(w[k], g[k]) for k in w)
  with pytest.raises(ValueError, match="num_threads and num_workers must be >= 0"):
    pipeline.Loader([src], num_workers=-1, **kw)
