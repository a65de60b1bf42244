"""Architecture search: budget accounting against real pruned models, enumeration against a
brute-force loop, one-shot scoring against numpy, determinism, the 8B dry run and bad targets."""

import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax import config as C
from minitron_jax import model as M
from minitron_jax.prune import importance as I
from minitron_jax.prune import search as S
from minitron_jax.recipe import search as R
from minitron_jax.prune import slicing
from minitron_jax.data.calib import CalibSpec
from minitron_jax.settings import SettingError
from minitron_jax.io import files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = C.preset("tiny").replace(num_attention_heads=6, num_key_value_heads=2,
                               num_hidden_layers=4, hidden_size=96, intermediate_size=192)


@pytest.fixture(scope="module")
def params():
  return M.init_params(SRC, jax.random.key(0), std=0.1)


def _scores(cfg, seed=0):
  return I.random_scores(cfg, seed), np.random.default_rng(seed + 1).random(cfg.num_hidden_layers)


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_equals_the_pruned_models_real_count(params, tie):
  src = SRC.replace(tie_word_embeddings=tie)
  p = dict(params)
  if tie:
    p.pop("lm_head")
  scores, layers = _scores(src)
  cands = [S.Candidate(96, (192,) * 4, 3, 2), S.Candidate(48, (64,) * 3, 2, 1),
           S.Candidate(96, (128,) * 2, 1, 2), S.Candidate(64, (192,) * 4, 2, 2)]
  for c in cands:
    pruned, cfg = slicing.prune(p, src, S.plan_for(src, c, scores, layers))
    real = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(pruned))
    assert S.param_count(src, c) == real == cfg.num_params(), c
    assert cfg == c.config(src)


def test_per_layer_mlp_widths_are_accounted_layer_by_layer():
  """The representation already carries one MLP width per layer (pruning does not yet)."""
  mixed = S.Candidate(64, (128, 32), 2, 1)
  same = [S.Candidate(64, (f, f), 2, 1) for f in (128, 32)]
  assert 2 * S.param_count(SRC, mixed) == sum(S.param_count(SRC, c) for c in same)
  with pytest.raises(NotImplementedError):
    mixed.intermediate_size


def test_memory_is_weights_at_export_dtype_plus_kv_cache():
  c = S.Candidate(64, (128,) * 3, 2, 1)
  cfg = c.config(SRC)
  shapes = jax.eval_shape(lambda k: M.init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))
  kv = np.zeros((cfg.num_hidden_layers, 2, 1000, cfg.num_key_value_heads, cfg.head_dim),
                jnp.bfloat16).nbytes  # keys and values of 1000 tokens in every layer
  assert S.memory_bytes(SRC, c, kv_tokens=1000, dtype="bfloat16") == weights + kv
  assert S.memory_bytes(SRC, c, 0, "float32") == 4 * S.param_count(SRC, c)


def _brute_force(src, b):
  """Every shape meeting the budget, by plain loops over the documented space."""
  hidden = [w for w in range(1, src.hidden_size + 1)
            if (w % (b.multiple or S.granule(src.hidden_size)) == 0 or w == src.hidden_size)
            and w >= (1 - b.max_width_cut) * src.hidden_size]
  mlp = [w for w in range(1, src.intermediate_size + 1)
         if (w % (b.multiple or S.granule(src.intermediate_size)) == 0
             or w == src.intermediate_size) and w >= (1 - b.max_width_cut) * src.intermediate_size]
  out = set()
  for d, f, g, k, n_l in itertools.product(hidden, mlp, range(1, src.num_groups + 1),
                                           range(1, src.num_key_value_heads + 1),
                                           range(1, src.num_hidden_layers + 1)):
    if (g * k < (1 - b.max_width_cut) * src.num_attention_heads or d % (g * k)
        or n_l < (1 - b.max_depth_cut) * src.num_hidden_layers):
      continue
    cfg = src.replace(hidden_size=d, intermediate_size=f, num_attention_heads=g * k,
                      num_key_value_heads=k, num_hidden_layers=n_l)
    n, mem = cfg.num_params(), None
    if b.target_params is not None and not (1 - b.slack) * b.target_params <= n <= b.target_params:
      continue
    mem = n * S.DTYPE_BYTES[b.dtype] + (2 * n_l * k * src.head_dim * b.kv_tokens
                                        * S.DTYPE_BYTES[b.dtype])
    if b.target_memory_gb is not None and mem > b.target_memory_gb * 1e9:
      continue
    out.add((d, f, g * k, k, n_l))
  return out


@pytest.mark.parametrize("budget", [
    S.Budget(target_params=2.5e5, slack=0.1, multiple=16),
    S.Budget(target_params=3.3e5, slack=0.2, max_width_cut=0.3, max_depth_cut=0.25),
    S.Budget(target_params=2.5e5, target_memory_gb=4.8e-4, kv_tokens=64, slack=0.2, multiple=8),
])
def test_enumeration_is_exactly_the_budgeted_space(budget):
  got = S.enumerate_candidates(SRC, budget)
  assert {(c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.num_layers)
          for c in got} == _brute_force(SRC, budget)
  sizes = [S.param_count(SRC, c) for c in got]
  assert sizes == sorted(sizes, reverse=True) and len(set(got)) == len(got)


def test_hardware_granules():
  assert S.granule(4096) == 128 and S.granule(14336) == 128  # Llama-3.1-8B
  assert S.granule(576) == 64 and S.granule(1536) == 64      # SmolLM2-135M
  assert S.granule(200) == 8 and S.granule(1000) == 8
  assert S.width_options(576, 0.5) == [320, 384, 448, 512, 576]


@pytest.mark.parametrize("kw,match", [
    (dict(target_params=5e5), "not below the teacher"),
    (dict(target_params=1e3), "smaller than .* smallest shape"),
    (dict(target_memory_gb=1e-9), "impossible"),
    (dict(), "give budget.target_params or target_memory_gb"),
    (dict(target_params=2e5, max_width_cut=1.0), "max_width_cut"),
    (dict(target_params=2e5, dtype="int3"), "budget.dtype"),
])
def test_bad_targets_are_one_line_errors(kw, match):
  with pytest.raises(ValueError, match=match) as e:
    S.enumerate_candidates(SRC, S.Budget(**kw))
  assert "\n" not in str(e.value)


def test_bad_target_via_cli_is_one_line_and_writes_nothing(tmp_path):
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "prune.py"),
                      "--model_dir=llama3.1-8b", f"--output_dir={out}", "--target_params=9e9",
                      "--dry_run"], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 1, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "--target_params=9e+09 is not below the teacher" in lines[0]
  assert not out.exists()


def test_llama31_8b_space_enumerates_and_accounts_at_eval_shape_cost(monkeypatch, capsys):
  """The full-size 8B -> 4.5B space: closed-form accounting equals the abstract model's count,
  and the dry run prints the table without any weights."""
  src = C.preset("llama3.1-8b", dtype="bfloat16")
  budget = S.Budget(target_params=4.5e9)
  cands = S.enumerate_candidates(src, budget)
  assert len(cands) > 100
  for c in S.shortlist(cands, src, 4) + [cands[-1]]:
    cfg = c.config(src)
    shapes = jax.eval_shape(lambda k: M.init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
    assert M.num_params(shapes) == S.param_count(src, c) <= 4.5e9
    assert S.param_count(src, c) >= 0.95 * 4.5e9

  def no_weights(*a, **k):
    raise AssertionError("the dry run must not load weights")

  monkeypatch.setattr(R.hf_io, "load_model", no_weights)
  monkeypatch.setattr(R.hf_io, "load_config", no_weights)
  R.run(R.SearchJob(model_dir="llama3.1-8b", output_dir="unused", budget=budget, dry_run=True,
                    max_candidates=5))
  out = capsys.readouterr().out
  assert f"{len(cands)} candidates meet the budget" in out and len(out.splitlines()) == 7


def _numpy_loss(p, cfg, windows):
  logits = np.asarray(M.forward(p, cfg, windows)["logits"], np.float64)[:, :-1]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, windows[:, 1:, None], -1).mean()


def test_scoring_from_cached_scores_equals_fresh_importance(params, tmp_path):
  rng = np.random.RandomState(0)
  batches = [rng.randint(0, SRC.vocab_size, (4, 16)) for _ in range(2)]
  held = rng.randint(0, SRC.vocab_size, (3, 16)).astype(np.int32)
  job = R.SearchJob(model_dir="-", output_dir="-", budget=S.Budget(target_params=2e5))
  scores, layers = R.compute_importance(job, params, SRC, batches)
  arrays = scores.to_npz_dict()
  arrays.update(layer_scores=layers)
  np.savez(tmp_path / "importance.npz", **arrays)
  cached, cached_layers = R.load_scores(str(tmp_path / "importance.npz"))
  cands = [S.Candidate(64, (128,) * 3, 2, 2), S.Candidate(96, (64,) * 2, 1, 2)]
  fresh = R.score_oneshot(params, SRC, cands, scores, layers, held, 2)
  again = R.score_oneshot(params, SRC, cands, cached, cached_layers, held, 2)
  assert fresh == again
  for c, loss in zip(cands, fresh):  # and each equals a numpy cross-entropy of the pruned model
    pruned, cfg = slicing.prune(params, SRC, S.plan_for(SRC, c, scores, layers))
    np.testing.assert_allclose(loss, _numpy_loss(pruned, cfg, held), rtol=1e-5)
    kept = S.plan_for(SRC, c, scores, layers).layers
    assert list(kept) == sorted(np.argsort(-layers, kind="stable")[:c.num_layers])


def test_rank_changes():
  assert S.rank_changes([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == [-2, 0, 2]
  assert S.rank_changes([1.0, 2.0], [1.0, 2.0]) == [0, 0]


def test_search_end_to_end_is_deterministic(tmp_path):
  """The whole search twice with one seed: the same report and the same pruned weights."""
  from minitron_jax.io import hf as hf_io

  for name in ("a", "b"):
    R.run(R.SearchJob(model_dir="smollm2-tiny-random", output_dir=str(tmp_path / name),
                      budget=S.Budget(target_params=5e6, slack=0.1, multiple=16),
                      max_candidates=2, top_k=2, search_steps=1, search_batch_size=2,
                      calib=CalibSpec(samples=4, seq_len=32, batch_size=4), eval_samples=2))
  a, b = (files.read_json(tmp_path / n / "search_report.json") for n in "ab")
  for k in ("seconds", "output_dir"):
    a.pop(k), b.pop(k)
  a["teacher_cache"].pop("seconds"), b["teacher_cache"].pop("seconds")  # times only
  assert a == b and a["teacher_cache"]["k"] == 64
  rows = a["candidates"]
  assert sum(r["winner"] for r in rows) == 1 and sum("distilled_loss" in r for r in rows) == 2
  winner = next(r for r in rows if r["winner"])
  assert winner["distilled_loss"] == min(r["distilled_loss"] for r in rows)
  for f in ("search.png", "prune_report.json", "importance.npz", "config.json"):
    assert (tmp_path / "a" / f).exists()
  cfg = hf_io.load_config(str(tmp_path / "a"))
  assert cfg.hidden_size == winner["hidden_size"] and cfg.num_params() == winner["params"]
  pa, _, _, _ = hf_io.load_model(str(tmp_path / "a"), with_tokenizer=False)
  pb, _, _, _ = hf_io.load_model(str(tmp_path / "b"), with_tokenizer=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, pa, pb)


def test_short_distillations_share_one_teacher_pass_and_a_task_ranks(tmp_path, monkeypatch,
                                                                     data_root):
  """The top candidates' short distillations read one teacher cache (written once, no teacher
  in the step), and `score_task` ranks the one-shot candidates by its accuracy, each equal to
  the task scored on that pruned model directly."""
  from minitron_jax.distill import run as trainer
  from minitron_jax.distill import teacher_cache as tc
  from minitron_jax.evaluate import scoring
  from minitron_jax.io import hf as hf_io
  from minitron_jax.io import registry

  writes, fits = [], []
  real_write, real_fit = tc.write_for_run, trainer.fit

  def write(*a, **kw):
    writes.append(a[5])  # k
    return real_write(*a, **kw)

  def fit(*a, **kw):
    fits.append((kw["teacher_cache"], kw["teacher_params"]))
    return real_fit(*a, **kw)

  monkeypatch.setattr(tc, "write_for_run", write)
  monkeypatch.setattr(trainer, "fit", fit)
  job = R.SearchJob(model_dir="smollm2-tiny-random", output_dir=str(tmp_path / "s"),
                    budget=S.Budget(target_params=5e6, slack=0.1, multiple=16),
                    max_candidates=3, top_k=2, search_steps=1, search_batch_size=2,
                    calib=CalibSpec(samples=4, seq_len=32, batch_size=4), eval_samples=2,
                    teacher_topk=8, score_task="piqa", task_limit=6, data_root=data_root)
  report = R.run(job)
  assert writes == [8] and len(fits) == 2
  assert all(cache and params is None for cache, params in fits)
  assert report["teacher_cache"]["k"] == 8 and report["teacher_cache"]["steps"] == 1
  rows = sorted(report["candidates"], key=lambda r: r["rank_oneshot"])
  assert report["ranked_by"].startswith("piqa")
  keys = [(-r["oneshot_task"]["acc"], r["oneshot_loss"]) for r in rows]
  assert keys == sorted(keys) and all(r["oneshot_task"]["examples"] == 6 for r in rows)
  assert [r["rank_oneshot"] for r in rows if "distilled_loss" in r] == [1, 2]
  src = str(registry.resolve_model_dir("smollm2-tiny-random"))
  params, cfg, tok, _ = hf_io.load_model(src)
  scores, layers = R.load_scores(str(tmp_path / "s" / "importance.npz"))
  for r in rows:
    c = S.Candidate(r["hidden_size"], (r["intermediate_size"],) * r["num_hidden_layers"],
                    r["num_attention_heads"] // r["num_key_value_heads"],
                    r["num_key_value_heads"])
    pruned, pcfg = slicing.prune(params, cfg, S.plan_for(cfg, c, scores, layers))
    direct = scoring.evaluate_task(pruned, pcfg, tok, "piqa", data_root, limit=6, batch_size=4,
                                   max_len=32, progress=False)
    assert r["oneshot_task"]["acc"] == direct[r["oneshot_task"]["metric"]]


def test_bad_search_task_is_refused_before_work():
  with pytest.raises(SettingError, match="score_task='nope'"):
    R.prepare(R.SearchJob(model_dir="smollm2-tiny-random", output_dir="-",
                           budget=S.Budget(target_params=5e6), score_task="nope"))
