"""Offline teacher logits: the cached KL against the live top-K KL and numpy, the cache against
the teacher's own top-K, resume of a write, and training from the cache against the live one."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax import axes, config, sharding
from minitron_jax import model as M
from minitron_jax.data import corpus as data, pipeline
from minitron_jax.distill import losses as distill
from minitron_jax.distill import run as trainer
from minitron_jax.distill import teacher_cache as tc
from minitron_jax.distill.step import TrainConfig


def _init(cfg, seed):
  rng = np.random.default_rng(seed)
  return axes.tree_from_leaves(
      (s, np.ones(axes.shape(s, cfg), np.float32) if s.path[-1].endswith("norm") else
       (0.05 * rng.standard_normal(axes.shape(s, cfg))).astype(np.float32))
      for s in axes.param_specs(cfg))


@pytest.fixture(scope="module")
def problem():
  tcfg = config.preset("tiny")
  scfg = tcfg.replace(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
  rng = np.random.default_rng(0)
  lengths = rng.integers(5, 40, 80)
  tokens = rng.integers(3, tcfg.vocab_size, lengths.sum()).astype(np.int32)
  stream = data.TokenStream(tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
  return _init(tcfg, 0), tcfg, _init(scfg, 1), scfg, stream


CFG = TrainConfig(steps=3, global_batch_size=4, micro_batch_size=2, seq_len=16, lr=3e-3,
                  warmup_steps=1, dtype="float32", save_every=0, log_every=100,
                  async_checkpointing=False)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cached_kl_equals_live_top_k_kl_and_numpy(temperature):
  rng = np.random.default_rng(0)
  s = rng.standard_normal((2, 5, 50)).astype(np.float32) * 3
  t = rng.standard_normal((2, 5, 50)).astype(np.float32) * 3
  v, idx = jax.lax.top_k(jnp.asarray(t), 8)
  got = np.asarray(distill.topk_kl_bt(s, v, idx, temperature))
  live = np.asarray(distill.forward_kl_bt(s, t, temperature, top_k=8))
  np.testing.assert_allclose(got, live, rtol=1e-6, atol=1e-6)
  # numpy: teacher renormalised over its top 8, student's full-vocabulary log-probabilities
  s64, t64 = s.astype(np.float64) / temperature, t.astype(np.float64) / temperature
  logq = s64 - np.log(np.exp(s64 - s64.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - s64.max(-1, keepdims=True)
  top = np.argsort(-t64, -1)[..., :8]
  tv = np.take_along_axis(t64, top, -1)
  p = np.exp(tv - tv.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ref = temperature ** 2 * (p * (np.log(p) - np.take_along_axis(logq, top, -1))).sum(-1)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_cache_holds_the_teachers_top_k_of_each_batch_and_resumes(problem, tmp_path):
  tp, tcfg, _, _, stream = problem
  d = str(tmp_path / "cache")
  tc.write_for_run(d, CFG, tp, tcfg, stream, k=5, log=lambda s: None)
  cache = tc.TeacherCache(d)
  assert cache.written() == 3 and cache.meta()["k"] == 5
  ds = pipeline.Loader([stream], seq_len=16, global_batch_size=4, seed=0)
  first = [cache.read(i) for i in range(3)]
  for i in range(3):  # entry i = the teacher's top 5 on batch i + 1, from a plain forward
    b = next(ds)
    logits = np.asarray(M.forward(tp, tcfg, b["tokens"], positions_bt=b["positions"],
                                  segment_ids_bt=b["segment_ids"])["logits"])
    np.testing.assert_array_equal(first[i]["tokens"], b["tokens"])
    np.testing.assert_allclose(first[i]["topk_values"], np.sort(logits, -1)[..., ::-1][..., :5],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        np.take_along_axis(logits, first[i]["topk_indices"], -1), first[i]["topk_values"])
  # An interrupted write (1 of 3 entries complete, the rest garbage) resumes at entry 1.
  with open(os.path.join(cache.shard, "written.json"), "w") as f:
    json.dump({"steps": 1}, f)
  import tensorstore as ts
  arr = ts.open({"driver": "zarr", "kvstore": {"driver": "file",
                                                "path": os.path.join(cache.shard, "values")}}
                ).result()
  arr[1:].write(np.zeros(arr[1:].shape, np.float32)).result()
  tc.write_for_run(d, CFG, tp, tcfg, stream, k=5, log=lambda s: None)
  for i in range(3):
    for key, v in tc.TeacherCache(d).read(i).items():
      np.testing.assert_array_equal(v, first[i][key])
  with pytest.raises(ValueError, match="seq_len"):
    tc.TeacherCache(d).check(TrainConfig(steps=3, global_batch_size=4, seq_len=32), 256, 3)
  with pytest.raises(ValueError, match="holds 3 steps"):
    tc.TeacherCache(d).check(CFG, 256, 4)


def _flat(params):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(sharding.host_params(params))[0]}


def test_training_from_the_cache_equals_training_with_the_live_top_k(problem, tmp_path):
  """Same steps, same batches: the cached step and the live teacher's top-K step agree, and a
  run resumed from a checkpoint reads on from the cache position."""
  tp, tcfg, sp, scfg, stream = problem
  d = str(tmp_path / "cache")
  tc.write_for_run(d, CFG, tp, tcfg, stream, k=8, log=lambda s: None)
  quiet = dict(log=lambda s: None)
  live = trainer.fit(CFG, model_params=sp, model_cfg=scfg, train_tokens=stream,
                     output_dir=str(tmp_path / "live"), teacher_params=tp, teacher_cfg=tcfg,
                     dcfg=distill.DistillConfig(top_k=8), **quiet)
  cached = trainer.fit(CFG, model_params=sp, model_cfg=scfg, train_tokens=stream,
                       output_dir=str(tmp_path / "cached"), teacher_cfg=tcfg,
                       dcfg=distill.DistillConfig(), teacher_cache=d, **quiet)
  for a, b in zip(live.history, cached.history):
    np.testing.assert_allclose(a["distill/kl"], b["distill/kl"], rtol=1e-5)
  fa, fb = _flat(live.params), _flat(cached.params)
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], rtol=1e-4, atol=1e-6)
  # Resume: a run stopped after its step-2 checkpoint continues with cache entry 2.
  cfg = TrainConfig(**{**CFG.__dict__, "save_every": 2})
  out = str(tmp_path / "resumed")
  trainer.fit(cfg, model_params=sp, model_cfg=scfg, train_tokens=stream, output_dir=out,
              teacher_cfg=tcfg, teacher_cache=d, **quiet)
  shutil.rmtree(os.path.join(out, "checkpoints", "3"))
  resumed = trainer.fit(cfg, model_params=sp, model_cfg=scfg, train_tokens=stream,
                        output_dir=out, teacher_cfg=tcfg, teacher_cache=d, **quiet)
  assert resumed.resumed_from == 2
  fr = _flat(resumed.params)
  for k in fb:
    np.testing.assert_allclose(fr[k], fb[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss,field", [
    (dict(hidden_loss="cosine"), "hidden_loss"), (dict(kl="reverse"), "kl"),
    (dict(embedding_weight=0.1), "embedding_weight")])
def test_cache_refuses_losses_it_cannot_serve(loss, field):
  from minitron_jax.settings import SettingError

  with pytest.raises(SettingError) as err:
    distill.check_topk_targets(distill.DistillConfig(**loss))
  assert err.value.field == field
  distill.check_topk_targets(distill.DistillConfig(ce_weight=0.5, top_k=4))
