"""Pruning equivalences, plan validity and importance formulas against numpy."""

import itertools

import jax
import numpy as np
import pytest

from helpers import count_compiles
from minitron_jax import axes, config as C
from minitron_jax.prune import importance as I
from minitron_jax.prune import layer_importance as LI
from minitron_jax import model as M
from minitron_jax.prune import slicing

CFG = C.preset("tiny").replace(num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=3)


@pytest.fixture(scope="module")
def params():
  p = M.init_params(CFG, jax.random.key(0), std=0.1)
  # Non-trivial norms so channel slicing of norm weights is exercised.
  for k in ("attn_norm", "mlp_norm"):
    p["layers"][k] = 1 + 0.2 * jax.random.normal(jax.random.key(1), p["layers"][k].shape)
  return p


def tokens(seed=0, b=2, t=12):
  return np.random.RandomState(seed).randint(0, CFG.vocab_size, (b, t))


def logits(p, cfg, x=None, **kw):
  return np.asarray(M.forward(p, cfg, tokens() if x is None else x, **kw)["logits"])


def test_pruning_mlp_neurons_equals_zeroing_them(params):
  rng = np.random.RandomState(0)
  keep = np.sort(np.stack([rng.choice(CFG.intermediate_size, 50, replace=False)
                           for _ in range(CFG.num_hidden_layers)]), -1)
  pruned, cfg = slicing.prune(params, CFG, slicing.PrunePlan(mlp=keep))
  mask = np.zeros((CFG.num_hidden_layers, CFG.intermediate_size), np.float32)
  np.put_along_axis(mask, keep, 1.0, axis=1)
  zeroed = jax.tree_util.tree_map(lambda x: x, params)
  zeroed["layers"]["down"] = params["layers"]["down"] * mask[:, :, None]
  assert cfg.intermediate_size == 50
  np.testing.assert_allclose(logits(pruned, cfg), logits(zeroed, CFG), atol=1e-5)


def test_pruning_query_heads_equals_zeroing_their_o_proj_inputs(params):
  scores = np.random.RandomState(1).rand(CFG.num_hidden_layers, CFG.num_attention_heads)
  kv, keep = slicing.select_heads(scores, I._group_sum(scores, CFG), CFG, 4, 2)
  # Every layer keeps 2 heads in each of the 2 groups: heads 0-2 are group 0, 3-5 group 1.
  assert (keep // CFG.num_groups == np.array([0, 0, 1, 1])).all() and (kv == [0, 1]).all()
  pruned, cfg = slicing.prune(params, CFG, slicing.PrunePlan(q_heads=keep))
  mask = np.zeros((CFG.num_hidden_layers, CFG.num_attention_heads), np.float32)
  np.put_along_axis(mask, keep, 1.0, axis=1)
  zeroed = jax.tree_util.tree_map(lambda x: x, params)
  zeroed["layers"]["o"] = params["layers"]["o"] * mask[:, :, None, None]
  np.testing.assert_allclose(logits(pruned, cfg), logits(zeroed, CFG), atol=1e-5)


def test_pruning_kv_groups_keeps_their_query_heads(params):
  scores = np.random.RandomState(2).rand(CFG.num_hidden_layers, CFG.num_attention_heads)
  groups = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
  kv, keep = slicing.select_heads(scores, groups, CFG, 3, 1)
  assert kv[:, 0].tolist() == [1, 0, 1]
  assert all(set(keep[l] // 3) == {kv[l, 0]} for l in range(3))
  pruned, cfg = slicing.prune(params, CFG, slicing.PrunePlan(q_heads=keep, kv_heads=kv))
  # Equivalent: zero the other group's query heads (their k/v then feed nothing).
  mask = np.zeros((3, 6), np.float32)
  np.put_along_axis(mask, keep, 1.0, axis=1)
  zeroed = jax.tree_util.tree_map(lambda x: x, params)
  zeroed["layers"]["o"] = params["layers"]["o"] * mask[:, :, None, None]
  assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (3, 1)
  np.testing.assert_allclose(logits(pruned, cfg), logits(zeroed, CFG), atol=1e-5)


def test_dropping_layers_equals_skipping_them(params):
  plan = slicing.PrunePlan(layers=np.array([0, 2]))
  pruned, cfg = slicing.prune(params, CFG, plan)
  skip = np.array([True, False, True])
  np.testing.assert_allclose(logits(pruned, cfg), logits(params, CFG, layer_mask=skip),
                             atol=1e-5)
  assert cfg.num_hidden_layers == 2


def test_keep_everything_returns_identical_params(params):
  full = slicing.PrunePlan(embed=np.arange(64), mlp=np.tile(np.arange(128), (3, 1)),
                     q_heads=np.tile(np.arange(6), (3, 1)), kv_heads=np.tile(np.arange(2), (3, 1)),
                     layers=np.arange(3))
  for plan in (slicing.PrunePlan(), full):
    pruned, cfg = slicing.prune(params, CFG, plan)
    assert cfg == CFG
    for (s, a), (_, b) in zip(axes.iter_leaves(params, CFG), axes.iter_leaves(pruned, cfg)):
      assert np.array_equal(np.asarray(a), np.asarray(b)), s.name


def test_hidden_channel_pruning_slices_every_occurrence(params):
  keep = np.sort(np.random.RandomState(3).choice(64, 40, replace=False))
  pruned, cfg = slicing.prune(params, CFG, slicing.PrunePlan(embed=keep))
  assert cfg.hidden_size == 40
  np.testing.assert_array_equal(pruned["embed"], np.asarray(params["embed"])[:, keep])
  np.testing.assert_array_equal(pruned["layers"]["q"], np.asarray(params["layers"]["q"])[:, keep])
  np.testing.assert_array_equal(pruned["layers"]["o"],
                                np.asarray(params["layers"]["o"])[..., keep])
  np.testing.assert_array_equal(pruned["final_norm"], np.asarray(params["final_norm"])[keep])
  assert np.isfinite(logits(pruned, cfg)).all()


@pytest.mark.parametrize("targets,pattern", [
    (dict(hidden_size=65), "larger than the source"),
    (dict(intermediate_size=0), "positive integer"),
    (dict(num_attention_heads=5), "not a multiple"),
    (dict(num_attention_heads=6, num_key_value_heads=1), "per group"),
    (dict(drop_layers="3"), "out of range"),
    (dict(drop_layers="0-2"), "every layer"),
    (dict(drop_layers=""), "empty"),
])
def test_illegal_targets_fail_before_work(targets, pattern):
  with pytest.raises(ValueError, match=pattern):
    slicing.Targets.from_flags(CFG, **targets).validate(CFG)


def _np_agg(x, how, axis):
  if how == "mean":
    return np.abs(x).mean(axis)
  if how == "l2":
    return np.sqrt((x.astype(np.float64) ** 2).sum(axis))
  return x.var(axis)


@pytest.mark.parametrize("batch_agg,seq_agg", list(itertools.product(I.AGGREGATIONS, repeat=2)))
def test_activation_scores_match_numpy(params, batch_agg, seq_agg):
  batches = [tokens(s, b=3, t=10) for s in range(3)]
  agg = I.Aggregation(batch=batch_agg, seq=seq_agg)
  scores = I.activation_scores(params, CFG, batches, agg)
  acts = [M.forward(params, CFG, b, taps={n: (lambda x: x) for n in
                                          ("attn_heads", "mlp_act", "attn_in", "mlp_in",
                                           "final_norm")})["taps"] for b in batches]
  cat = {k: np.concatenate([np.asarray(a[k], np.float64) for a in acts],
                           axis=0 if k == "final_norm" else 1) for k in acts[0]}
  heads = _np_agg(_np_agg(np.linalg.norm(cat["attn_heads"], axis=-1), seq_agg, 2), batch_agg, 1)
  neurons = _np_agg(_np_agg(cat["mlp_act"], seq_agg, 2), batch_agg, 1)
  channels = (_np_agg(_np_agg(cat["attn_in"], seq_agg, 2), batch_agg, 1).sum(0)
              + _np_agg(_np_agg(cat["mlp_in"], seq_agg, 2), batch_agg, 1).sum(0)
              + _np_agg(_np_agg(cat["final_norm"], seq_agg, 1), batch_agg, 0))
  for got, want in ((scores.heads, heads), (scores.neurons, neurons),
                    (scores.channels, channels)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(scores.kv_groups, heads.reshape(3, 2, 3).sum(-1), rtol=2e-4)


def test_magnitude_and_taylor_group_sums_match_numpy(params):
  s = I.magnitude_scores(params, CFG)
  q, o = np.asarray(params["layers"]["q"]), np.asarray(params["layers"]["o"])
  np.testing.assert_allclose(s.heads, np.sqrt((q ** 2).sum((1, 3)) + (o ** 2).sum((2, 3))),
                             rtol=1e-5)
  g, u, d = (np.asarray(params["layers"][k]) for k in ("gate", "up", "down"))
  np.testing.assert_allclose(s.neurons, np.sqrt((g ** 2).sum(1) + (u ** 2).sum(1) +
                                                (d ** 2).sum(2)), rtol=1e-5)
  batches = [tokens(0, b=2, t=8)]
  t = I.taylor_scores(params, CFG, batches)
  grads = jax.grad(lambda p: I.lm_loss(p, CFG, batches[0]))(params)
  wg = np.abs(np.asarray(params["layers"]["gate"]) * np.asarray(grads["layers"]["gate"]))
  wu = np.abs(np.asarray(params["layers"]["up"]) * np.asarray(grads["layers"]["up"]))
  wd = np.abs(np.asarray(params["layers"]["down"]) * np.asarray(grads["layers"]["down"]))
  np.testing.assert_allclose(t.neurons, wg.sum(1) + wu.sum(1) + wd.sum(2), rtol=1e-4,
                             atol=1e-9)
  r1, r2 = I.random_scores(CFG, 0), I.random_scores(CFG, 0)
  assert np.array_equal(r1.heads, r2.heads) and r1.neurons.shape == (3, 128)


def test_importance_reuses_compiled_functions(params):
  """A second call with the same config and shapes compiles nothing (each function used to
  build a fresh `jax.jit` per call)."""
  batches = [tokens(s, b=2, t=11) for s in range(2)]  # a shape no other test compiles

  def run_all():
    return (I.taylor_scores(params, CFG, batches), I.activation_scores(params, CFG, batches),
            LI.block_importance(params, CFG, batches, block_sizes=(1,)),
            LI.lm_loss_drop(params, CFG, batches, block_sizes=(1,)))

  with count_compiles() as first:
    want = run_all()
  assert len(first) >= 4  # the listener sees each function's compilation
  with count_compiles() as second:
    got = run_all()
  assert second == []
  for a, b in zip(want[:2], got[:2]):
    for k in ("heads", "neurons", "channels", "kv_groups"):
      np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
  np.testing.assert_array_equal(want[2][1], got[2][1])
  assert want[3][0] == got[3][0]


def test_activation_variance_merges_batches_stably(params):
  """Chan's pairwise merge on float32 device sums: batches of different sizes, and values
  with a large common offset, where sum(x^2)/n - mean^2 in float32 would cancel."""
  rng = np.random.RandomState(0)
  x = 1000.0 + rng.randn(11, 5).astype(np.float32)
  acc = {"n": np.float32(0), "mean": np.zeros(5, np.float32), "m2": np.zeros(5, np.float32)}
  for part in (x[:1], x[1:4], x[4:]):
    acc = I.merge_stats(acc, I.batch_stats(part, "var"))
  np.testing.assert_allclose(I.finish_stats(jax.device_get(acc), 11, "var"),
                             x.astype(np.float64).var(0), rtol=1e-3)
  with pytest.raises(ValueError, match="no calibration samples"):
    I.activation_scores(params, CFG, [])
  with pytest.raises(ValueError, match="no calibration samples"):
    I.taylor_scores(params, CFG, [])


def test_layer_importance_matches_direct_computation(params):
  batches = [tokens(0, b=2, t=10)]
  bi = LI.block_importance(params, CFG, batches, block_sizes=(1, 2))
  out = M.forward(params, CFG, batches[0], return_hidden=True)
  h = np.concatenate([np.asarray(out["embeddings"])[None], np.asarray(out["hidden"])])

  def cos(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

  for k in (1, 2):
    want = [1 - cos(h[i], h[i + k]).mean() for i in range(3 - k + 1)]
    np.testing.assert_allclose(bi[k], want, rtol=1e-4, atol=1e-6)
  base, drops = LI.lm_loss_drop(params, CFG, batches, block_sizes=(1,))
  for i in range(3):
    p, c = LI.drop_layers_params(params, CFG, [i])
    assert abs(drops[1][i] - float(I.lm_loss(p, c, batches[0]))) < 1e-5
  assert abs(base - float(I.lm_loss(params, CFG, batches[0]))) < 1e-6


def test_accuracy_drop_matches_evaluating_the_pruned_model(real_model, data_root):
  from minitron_jax.evaluate import scoring as E

  tok = real_model[2]
  cfg = CFG.replace(vocab_size=49152)
  p = M.init_params(cfg, jax.random.key(5), std=0.3)
  base, acc = LI.accuracy_drop(p, cfg, tok, "piqa", data_root, block_sizes=(1, 2), limit=6,
                               batch_size=4)
  assert set(acc) == {1, 2} and len(acc[1]) == 3 and len(acc[2]) == 2
  assert base == E.evaluate_task(p, cfg, tok, "piqa", data_root, limit=6, progress=False)["acc"]
  keep = np.array([0, 2])
  pruned, c = slicing.prune(p, cfg, slicing.PrunePlan(layers=keep))
  want = E.evaluate_task(pruned, c, tok, "piqa", data_root, limit=6, progress=False)["acc"]
  assert acc[1][1] == want
