"""Log-likelihood scoring, task metrics and generation against independent references."""

import jax
import numpy as np
import pytest
import torch

from helpers import count_compiles, float64_transformers, make_hf_llama
from minitron_jax import config as C, model as M
from minitron_jax.evaluate import scoring as E
from minitron_jax.evaluate import generate as G
from minitron_jax.io import hf as hf_io
from minitron_jax.evaluate import tasks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random HF Llama with the real tokenizer's vocabulary size."""
  model, d = make_hf_llama(tmp_path_factory.mktemp("tiny") / "m", vocab=49152, hidden=32,
                           inter=48, heads=4, kv_heads=2, max_pos=512)
  params, cfg = hf_io.load_hf(d)
  return model, params, cfg


def _torch_loglik(model, ctx, cont):
  x = torch.tensor([list(ctx) + list(cont)])
  with torch.no_grad():
    logp = torch.log_softmax(model(x).logits[0].double(), -1)
  n = len(ctx)
  targets = x[0, n:]
  lp = logp[n - 1:-1].gather(1, targets[:, None])[:, 0]
  greedy = bool((logp[n - 1:-1].argmax(-1) == targets).all())
  return float(lp.sum()), greedy


@pytest.mark.parametrize("min_row,batch", [(256, 3), (1, 1)])
def test_loglikelihoods_match_torch(tiny, monkeypatch, min_row, batch):
  """Requests packed several to a row (256 tokens), or one row per call (128-token rows)."""
  monkeypatch.setattr(E, "MIN_ROW_TOKENS", min_row)
  model, params, cfg = tiny
  rng = np.random.RandomState(0)
  pairs = [(rng.randint(0, cfg.vocab_size, n).tolist(), rng.randint(0, cfg.vocab_size, m).tolist())
           for n, m in [(1, 1), (5, 3), (40, 2), (17, 9), (3, 30), (70, 1), (2, 2)]]
  # Requests with the same input tokens run once: four one-token options of one context, and
  # a two-token continuation whose inputs equal a longer context's.
  shared = rng.randint(0, cfg.vocab_size, 12).tolist()
  pairs += [(shared, [t]) for t in (5, 6, 7, 8)] + [(shared[:-1], [shared[-1], 9])]
  lls, greedy = E.loglikelihoods(params, cfg, pairs, batch_size=batch)
  for (ctx, cont), ll, g in zip(pairs, lls, greedy):
    ref_ll, ref_g = _torch_loglik(model, ctx, cont)
    assert abs(ll - ref_ll) < 1e-3 and g == ref_g
  # A request longer than max_len keeps its last max_len input tokens.
  long_ctx, cont = rng.randint(0, cfg.vocab_size, 50).tolist(), [7, 8]
  ll, _ = E.loglikelihoods(params, cfg, [(long_ctx, cont)], max_len=20)
  ref_ll, _ = _torch_loglik(model, (long_ctx + cont)[-21:-2], cont)
  assert abs(ll[0] - ref_ll) < 1e-3


def test_float64_loglikelihoods_match_a_float64_reference(tiny):
  """Packed scoring of a float64 model (the reference the harness benchmark measures float32
  backends against) keeps every step in float64: 1e-9 from transformers in float64."""
  model, params, cfg = tiny
  rng = np.random.RandomState(1)
  pairs = [(rng.randint(0, cfg.vocab_size, n).tolist(), rng.randint(0, cfg.vocab_size, m).tolist())
           for n, m in [(5, 3), (40, 20), (3, 60)]]
  with jax.enable_x64(True):
    p64 = jax.tree_util.tree_map(lambda x: jax.numpy.asarray(x, "float64"), params)
    lls, _ = E.loglikelihoods(p64, cfg.replace(dtype="float64"), pairs, batch_size=2)
  with float64_transformers(model) as ref:
    want = [_torch_loglik(ref, ctx, cont)[0] for ctx, cont in pairs]
  assert np.abs(lls - np.array(want)).max() < 1e-9


def test_pack_rows_first_fit_decreasing():
  lengths = [70, 5, 40, 17, 3, 60, 2, 64]
  rows = E.pack_rows(lengths, 128)
  assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
  assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
  assert rows == [[0, 2, 3], [7, 5, 4], [1, 6]]  # 261 tokens: three rows are the least
  with pytest.raises(ValueError, match="does not fit"):
    E.pack_rows([129], 128)


def test_greedy_flag_on_constructed_continuation(tiny):
  _, params, cfg = tiny
  ctx = [5, 6, 7]
  logits = M.forward(params, cfg, np.array([ctx]))["logits"][0, -1]
  best = int(np.argmax(logits))
  _, greedy = E.loglikelihoods(params, cfg, [(ctx, [best]), (ctx, [(best + 1) % cfg.vocab_size])])
  assert greedy.tolist() == [True, False]


@pytest.mark.parametrize("task", ["piqa", "hellaswag", "lambada", "winogrande"])
def test_task_metrics_match_independent_scoring(tiny, real_model, data_root, task):
  model, params, cfg = tiny
  tok = real_model[2]
  res = E.evaluate_task(params, cfg, tok, task, data_root, limit=6, batch_size=4,
                        progress=False)
  examples = tasks.load_task(task, data_root, limit=6)
  acc = acc_norm = 0
  lls = []
  for ex, pairs in zip(examples, tasks.tokenize_requests(examples, tok)):
    scored = [_torch_loglik(model, c, k) for c, k in pairs]
    ll = np.array([s[0] for s in scored])
    lls.append(ll[0])
    if task == "lambada":
      acc += scored[0][1]
      continue
    lengths = np.array([len(r.continuation.lstrip(" ")) for r in ex.requests], float)
    acc += int(np.argmax(ll)) == ex.label
    acc_norm += int(np.argmax(ll / lengths)) == ex.label
  assert res["examples"] == 6 and res["acc"] == acc / 6
  if "acc_norm" in res:
    assert res["acc_norm"] == acc_norm / 6
  if task == "lambada":
    assert abs(res["ppl"] - np.exp(-np.mean(lls))) / res["ppl"] < 1e-6


def test_perplexity_protocol_windows():
  cfg = C.preset("tiny")
  params = M.init_params(cfg, jax.random.key(0))
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, 1000)
  res = E.perplexity(params, cfg, ids, seq_len=64, batch_size=3, progress=False)
  assert res["windows"] == 1000 // 64 and res["tokens"] == 15 * 63
  # Independent: per-window mean NLL from a plain forward.
  total = 0.0
  for w in range(15):
    x = ids[w * 64:(w + 1) * 64]
    logp = jax.nn.log_softmax(M.forward(params, cfg, x[None])["logits"][0], -1)
    total -= float(np.sum(np.take_along_axis(np.asarray(logp[:-1]), x[1:, None], 1)))
  assert abs(res["nll"] - total / (15 * 63)) < 1e-5
  capped = E.perplexity(params, cfg, ids, seq_len=64, max_windows=4, progress=False)
  assert capped["windows"] == 4 and capped["tokens"] == 4 * 63
  with pytest.raises(ValueError, match="fewer than one window"):
    E.perplexity(params, cfg, ids[:10], seq_len=64)


def test_perplexity_windows_start_with_bos():
  cfg = C.preset("tiny")
  params = M.init_params(cfg, jax.random.key(0))
  ids = np.random.RandomState(1).randint(3, cfg.vocab_size, 300)
  res = E.perplexity(params, cfg, ids, seq_len=64, progress=False, bos_id=1)
  assert res["windows"] == 300 // 63 and res["tokens"] == 4 * 63
  total = 0.0  # independent: BOS then 63 text tokens, every text token predicted
  for w in range(4):
    x = np.concatenate([[1], ids[w * 63:(w + 1) * 63]])
    logp = jax.nn.log_softmax(M.forward(params, cfg, x[None])["logits"][0], -1)
    total -= float(np.sum(np.take_along_axis(np.asarray(logp[:-1]), x[1:, None], 1)))
  assert abs(res["nll"] - total / (4 * 63)) < 1e-5


class _Tok:
  bos_token_id = 5

  def __init__(self, adds_bos):
    self.adds_bos = adds_bos

  def __call__(self, text, add_special_tokens=True):
    return {"input_ids": ([5] if self.adds_bos and add_special_tokens else []) + [9]}


def test_bos_prefix_follows_what_the_tokenizer_adds():
  assert E.bos_prefix(_Tok(True)) == 5 and E.bos_prefix(_Tok(False)) is None


def test_decode_compiles_once_per_length_bucket():
  cfg = C.preset("tiny", eos_token_id=None)
  params = M.init_params(cfg, jax.random.key(0))
  prefill, decode = G.steps_for(cfg)
  with count_compiles() as compiles:
    res = G.generate(params, cfg, [[3, 4, 5], [6]], G.SamplingConfig(max_new_tokens=32),
                     stop_at_eos=False)
  assert len(res.tokens[0]) == 32 and res.decode_steps == 31
  # Prompt bucket 16; decode attends to 32 slots, then to 64 (the whole cache): 2 shapes.
  assert decode._cache_size() == 2 and prefill._cache_size() == 1
  assert len(compiles) >= 3  # the listener sees compilations (prefill and both decodes)
  with count_compiles() as compiles:
    G.generate(params, cfg, [[9, 9, 9], [1, 2]],
               G.SamplingConfig(max_new_tokens=32, temperature=0.7, top_p=0.9),
               stop_at_eos=False)
    G.generate(params, cfg, [[9, 9, 9], [1, 2]], G.SamplingConfig(max_new_tokens=32),
               eos_ids=[5, 6, 7])
  assert compiles == []  # same buckets, other sampling settings or EOS ids: nothing compiles
  assert decode._cache_size() == 2 and prefill._cache_size() == 1


def test_generation_across_length_buckets_matches_full_forward():
  cfg = C.preset("tiny", eos_token_id=None)
  params = M.init_params(cfg, jax.random.key(4))
  prompts = [[5, 6, 7, 8, 9], [10, 11]]
  # 40 new tokens after a 16-slot prompt bucket: attention spans 32, then 64 slots.
  res = G.generate(params, cfg, prompts, G.SamplingConfig(max_new_tokens=40), stop_at_eos=False)
  for prompt, got in zip(prompts, res.tokens):
    # Greedy decoding: every token is the argmax of the causal forward over what precedes it,
    # read here from one forward of the whole sequence (position p sees tokens 0..p only).
    seq = np.array([list(prompt) + got])
    want = np.argmax(np.asarray(M.forward(params, cfg, seq)["logits"][0]), axis=-1)
    assert len(got) == 40 and got == want[len(prompt) - 1:-1].tolist()
  assert res.decode_steps == 39
  # EOS past the first bucket boundary: row 0 stops at its EOS, the batch when both have.
  a, b = res.tokens[0][20], res.tokens[1][25]
  eos = [a, b]
  cut = G.generate(params, cfg, prompts, G.SamplingConfig(max_new_tokens=40), eos_ids=eos)
  for got, full in zip(cut.tokens, res.tokens):
    first = min(full.index(e) for e in eos if e in full)
    assert got == full[:first]
  assert cut.decode_steps == max(len(t) for t in cut.tokens)
  assert cut.decode_steps > 16  # it ran into the second bucket (slots 32..63)
  # EOS as the very first token: no decode step runs.
  first = G.generate(params, cfg, prompts, G.SamplingConfig(max_new_tokens=40),
                     eos_ids=[res.tokens[0][0], res.tokens[1][0]])
  assert first.tokens == [[], []] and first.decode_steps == 0


def test_generation_stops_at_eos_and_matches_full_forward():
  cfg = C.preset("tiny")
  params = M.init_params(cfg, jax.random.key(3))
  prompt = [5, 6, 7, 8]
  res = G.generate(params, cfg, [prompt], G.SamplingConfig(max_new_tokens=12),
                   stop_at_eos=False)
  seq = list(prompt)
  for _ in range(12):
    seq.append(int(np.argmax(M.forward(params, cfg, np.array([seq]))["logits"][0, -1])))
  assert res.tokens[0] == seq[len(prompt):]
  stop = res.tokens[0][3]
  cut = G.generate(params, cfg, [prompt], G.SamplingConfig(max_new_tokens=12), eos_ids=[stop])
  assert cut.tokens[0] == res.tokens[0][:res.tokens[0].index(stop)]


def test_top_p_keeps_only_the_nucleus():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  draw = jax.jit(jax.vmap(G.sample, in_axes=(None, 0, None, None)))
  toks = draw(logits, jax.random.split(jax.random.key(0), 400), np.float32(1.0),
              np.float32(0.7))
  seen = set(np.asarray(toks)[:, 0].tolist())
  assert seen == {0, 1}
  assert int(G.sample(logits, jax.random.key(0), np.float32(0.0), np.float32(0.7))[0]) == 0


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_nucleus_through_top_k_keeps_the_sorted_nucleus(top_p):
  """The top-k path draws only from the full sort's nucleus, and reaches all of it; where the
  nucleus does not fit inside the top k, the full sort serves the draw."""
  logits = 3 * jax.random.normal(jax.random.key(1), (2, 300))
  keep = np.asarray(G.nucleus_keep(logits, np.float32(top_p)))
  for k in (8, 64, 300):
    draw = jax.jit(jax.vmap(lambda key: G.nucleus_sample(key, logits, np.float32(top_p), k)))
    toks = np.asarray(draw(jax.random.split(jax.random.key(0), 3000)))
    for row in range(2):
      seen = set(toks[:, row].tolist())
      assert seen <= set(np.flatnonzero(keep[row]).tolist())
      probs = np.asarray(jax.nn.softmax(logits[row]))
      # Every kept token with >= 1 % of the nucleus's mass shows up in 3000 draws.
      big = {int(i) for i in np.flatnonzero(keep[row])
             if probs[i] / probs[keep[row]].sum() > 0.01}
      assert big <= seen


def test_stop_when_ends_generation_early_with_a_prefix_of_the_full_run():
  cfg = C.preset("tiny", eos_token_id=None)
  params = M.init_params(cfg, jax.random.key(5))
  prompts = [[5, 6, 7], [8], [9, 10, 11, 12]]
  sampling = G.SamplingConfig(max_new_tokens=40)
  full = G.generate(params, cfg, prompts, sampling, stop_at_eos=False)
  seen = []

  def stop_when(rows):
    seen.append(len(rows[0]))
    return len(rows[0]) >= 10

  short = G.generate(params, cfg, prompts, sampling, stop_at_eos=False, stop_when=stop_when,
                     check_every=4)
  assert seen[-1] >= 10 and short.decode_steps < full.decode_steps
  assert len(short.tokens) == 3 and all(len(r) == seen[-1] for r in short.tokens)
  for a, b in zip(short.tokens, full.tokens):
    assert a == b[:len(a)]
