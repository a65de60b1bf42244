"""Distillation losses against numpy references and finite differences; schedule; accumulation."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax import config, model as M
from minitron_jax.distill import losses as distill
from minitron_jax.distill import step as train
from minitron_jax.distill.losses import DistillConfig


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(s, t, tau=1.0, kind="forward", top_k=None):
  """Per-token tau^2 KL in float64 numpy."""
  s, t = np.asarray(s, np.float64) / tau, np.asarray(t, np.float64) / tau
  logq, logp = _np_log_softmax(s), _np_log_softmax(t)
  if kind == "reverse":
    return tau ** 2 * (np.exp(logq) * (logq - logp)).sum(-1)
  if top_k is not None:
    idx = np.argsort(-t, axis=-1, kind="stable")[..., :top_k]
    logp = _np_log_softmax(np.take_along_axis(t, idx, -1))
    logq = np.take_along_axis(logq, idx, -1)
  return tau ** 2 * (np.exp(logp) * (logp - logq)).sum(-1)


def _kl_loss(student, teacher, mask=None, *, temperature=1.0, kind="forward", top_k=None):
  """The masked mean token KL, as the distillation loss computes its logit term."""
  per_bt = distill.kl_bt(student, teacher, DistillConfig(temperature=temperature, kl=kind,
                                                          top_k=top_k))
  mask = jnp.ones(per_bt.shape, bool) if mask is None else mask
  loss = distill.masked_mean(per_bt, mask)
  return loss, {"distill/kl": loss}


def _logits(seed, shape=(2, 5, 11), scale=3.0):
  rng = np.random.default_rng(seed)
  return (scale * rng.normal(size=shape)).astype(np.float32)


@pytest.mark.parametrize("kind,top_k", [("forward", None), ("reverse", None), ("forward", 11)])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_kl_is_zero_for_identical_logits(kind, top_k, tau):
  x = _logits(0)
  loss, metrics = _kl_loss(x, x, temperature=tau, kind=kind, top_k=top_k)
  assert abs(float(loss)) < 1e-6 and set(metrics) == {"distill/kl"}


@pytest.mark.parametrize("kind,top_k", [("forward", None), ("reverse", None), ("forward", 3)])
@pytest.mark.parametrize("tau", [1.0, 0.7, 4.0])
def test_kl_matches_numpy_with_mask(kind, top_k, tau):
  s, t = _logits(1), _logits(2)
  mask = np.random.default_rng(3).random(s.shape[:2]) < 0.6
  want_bt = np_kl(s, t, tau, kind, top_k)
  got_bt = distill.kl_bt(s, t, DistillConfig(temperature=tau, kl=kind, top_k=top_k))
  np.testing.assert_allclose(np.asarray(got_bt), want_bt, rtol=1e-5, atol=1e-6)
  loss, _ = _kl_loss(s, t, mask, temperature=tau, kind=kind, top_k=top_k)
  np.testing.assert_allclose(float(loss), want_bt[mask].mean(), rtol=1e-5)


def test_top_k_pushes_mass_onto_the_teacher_top_k():
  x = _logits(4)
  # With the same logits the top-k loss is -tau^2 log(student mass on the top k): > 0.
  loss = float(_kl_loss(x, x, top_k=2)[0])
  np.testing.assert_allclose(loss, np_kl(x, x, top_k=2).mean(), rtol=1e-5)
  assert loss > 0.01


@pytest.mark.parametrize("kind,top_k", [("forward", None), ("reverse", None), ("forward", 4)])
def test_kl_gradient_matches_central_differences(kind, top_k):
  with jax.enable_x64(True):
    s = jnp.asarray(_logits(5, (1, 3, 7)), jnp.float64)
    t = jnp.asarray(_logits(6, (1, 3, 7)), jnp.float64)
    mask = jnp.asarray([[True, False, True]])

    def f(x):
      return _kl_loss(x, t, mask, temperature=1.7, kind=kind, top_k=top_k)[0]

    grad = np.asarray(jax.grad(f)(s))
    assert grad.dtype == np.float64
    num = np.zeros_like(grad)
    eps = 1e-6
    for i in np.ndindex(*s.shape):
      e = np.zeros(s.shape)
      e[i] = eps
      num[i] = (float(f(s + e)) - float(f(s - e))) / (2 * eps)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-9)
    assert np.all(grad[0, 1] == 0)  # masked position


def test_bad_arguments_are_refused():
  x = _logits(0)
  with pytest.raises(ValueError, match="temperature"):
    _kl_loss(x, x, temperature=0.0)
  with pytest.raises(ValueError, match="temperature"):
    DistillConfig(temperature=-1.0)
  with pytest.raises(ValueError, match="top_k"):
    DistillConfig(kl="reverse", top_k=5)
  with pytest.raises(ValueError, match="shape"):
    _kl_loss(x, x[..., :5])
  with pytest.raises(ValueError, match="hidden_loss"):
    DistillConfig(hidden_loss="l1")
  with pytest.raises(ValueError, match="ce_weight"):
    DistillConfig(ce_weight=-1.0)
  with pytest.raises(ValueError, match="layer map"):
    distill.resolve_layer_map(None, 2, 4)
  with pytest.raises(ValueError, match="teacher layers"):
    distill.resolve_layer_map([0, 9], 2, 4)
  with pytest.raises(ValueError, match="entries"):
    distill.resolve_layer_map([0], 2, 4)
  with pytest.raises(ValueError, match="cosine"):
    distill.hidden_distance(x, x, "l1")
  with pytest.raises(ValueError, match="micro_batch_size"):
    train.TrainConfig(global_batch_size=8, micro_batch_size=3)
  with pytest.raises(ValueError, match="min_lr"):
    train.TrainConfig(lr=1e-4, min_lr=1e-3)


def test_layer_map_parsing_and_report(tmp_path):
  assert distill.parse_layer_map("0,1,4-6, 9") == (0, 1, 4, 5, 6, 9)
  with pytest.raises(ValueError, match="not an index"):
    distill.parse_layer_map("0,x")
  report = tmp_path / "report.json"
  report.write_text(json.dumps({"depth": {"kept_layers": [0, 2, 3]}, "other": 1}))
  assert distill.layer_map_from_report(report) == (0, 2, 3)
  # The layout `prune.plan_summary` writes: kept indices per axis, null = all kept.
  report.write_text(json.dumps({"kept": {"embed": [0, 3, 5], "mlp": None, "layers": [1, 4]}}))
  assert distill.layer_map_from_report(report) == (1, 4)
  assert distill.kept_embed_from_report(report) == (0, 3, 5)
  report.write_text(json.dumps({"kept": {"embed": None, "layers": None}}))
  assert distill.layer_map_from_report(report) is None
  assert distill.kept_embed_from_report(report) is None
  report.write_text(json.dumps({"kept": [1]}))
  with pytest.raises(ValueError, match="kept_layers"):
    distill.layer_map_from_report(report)
  report.write_text(json.dumps({"kept_layers": [0, "x"]}))
  with pytest.raises(ValueError, match="integers"):
    distill.layer_map_from_report(report)
  with pytest.raises(FileNotFoundError):
    distill.layer_map_from_report(tmp_path / "missing.json")


def test_selection_projection_puts_channels_back():
  proj = distill.selection_projection([0, 3, 5], 6)
  x = np.arange(1.0, 4.0, dtype=np.float32)
  np.testing.assert_array_equal(x @ proj, [1, 0, 0, 2, 0, 3])
  with pytest.raises(ValueError, match="repeat"):
    distill.selection_projection([1, 1], 6)
  with pytest.raises(ValueError, match="lie in"):
    distill.selection_projection([0, 6], 6)


def test_next_token_labels_never_cross_documents():
  tokens = np.array([[5, 6, 7, 8, 9, 10, 0, 0]])
  segs = np.array([[1, 1, 1, 2, 2, 3, 0, 0]])
  labels, valid = distill.next_token_labels(jnp.asarray(tokens), jnp.asarray(segs))
  np.testing.assert_array_equal(np.asarray(valid)[0], [1, 1, 0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(labels)[0, :5], [6, 7, 8, 9, 10])
  _, valid = distill.next_token_labels(jnp.asarray(tokens))
  np.testing.assert_array_equal(np.asarray(valid)[0], [1] * 7 + [0])
  np.testing.assert_array_equal(np.asarray(distill.token_mask(jnp.asarray(segs), (1, 8)))[0],
                                [1, 1, 1, 1, 1, 1, 0, 0])


def _np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)


@pytest.mark.parametrize("kind", ["cosine", "nmse"])
def test_hidden_loss_matches_numpy_with_projection_and_layer_map(kind):
  rng = np.random.default_rng(7)
  hs = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)  # (L_s, B, T, D)
  ht = rng.normal(size=(4, 3, 4, 8)).astype(np.float32)  # (L_t, B, T, E)
  proj = rng.normal(size=(6, 8)).astype(np.float32)
  layer_map = (1, 3)
  got = np.asarray(distill.hidden_loss_bt(hs, ht, layer_map, proj, kind))
  s = _np_normalize(hs) @ proj
  t = _np_normalize(ht[list(layer_map)])
  if kind == "cosine":
    d = 1 - (s * t).sum(-1) / np.sqrt((s * s).sum(-1) * (t * t).sum(-1))
  else:
    d = ((s - t) ** 2).sum(-1) / (t * t).sum(-1)
  np.testing.assert_allclose(got, d.mean(0), rtol=1e-4, atol=1e-5)
  assert abs(float(distill.hidden_loss_bt(ht, ht, range(4), None, kind).max())) < 1e-5


@functools.lru_cache(maxsize=None)
def _tiny_pair(student_width=32):
  tcfg = config.preset("tiny")
  scfg = tcfg.replace(hidden_size=student_width, intermediate_size=64, num_hidden_layers=1)
  return (M.init_params(tcfg, jax.random.key(0)), tcfg,
          M.init_params(scfg, jax.random.key(1)), scfg)


def _batch(seed, a, rows, t=16, vocab=256):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (a, rows, t)).astype(np.int32)
  segs = np.ones((a, rows, t), np.int32)
  segs[..., t // 2:] = 2
  segs[..., -3:] = 0  # padding
  pos = np.where(segs == 2, np.arange(t) - t // 2, np.arange(t)).astype(np.int32)
  pos[segs == 0] = 0
  return {"tokens": tokens, "segment_ids": segs, "positions": pos}


def test_distillation_loss_gradients_reach_student_and_projection():
  tp, tcfg, sp, scfg = _tiny_pair()
  dcfg = DistillConfig(hidden_loss="cosine", embedding_weight=0.5, ce_weight=0.1,
                       layer_map=(1,))
  proj = distill.init_projection(jax.random.key(2), 32, 64)
  b = jax.tree_util.tree_map(lambda x: x[0], _batch(0, 1, 2))

  def loss_fn(params):
    s = M.forward(params["model"], scfg, b["tokens"], positions_bt=b["positions"],
                  segment_ids_bt=b["segment_ids"], return_hidden=True)
    t = jax.lax.stop_gradient(M.forward(tp, tcfg, b["tokens"], positions_bt=b["positions"],
                                        segment_ids_bt=b["segment_ids"], return_hidden=True))
    return distill.distillation_loss(s, t, b["tokens"], b["segment_ids"], params["proj"], dcfg)

  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      {"model": sp, "proj": proj})
  assert set(metrics) == {"distill/kl", "distill/hidden", "distill/alpha", "distill/embedding",
                          "distill/ce", "distill/loss"}
  assert grads["proj"].shape == (32, 64) and float(jnp.abs(grads["proj"]).sum()) > 0
  assert jax.tree_util.tree_structure(grads["model"]) == jax.tree_util.tree_structure(sp)
  for g, p in zip(jax.tree_util.tree_leaves(grads["model"]), jax.tree_util.tree_leaves(sp)):
    assert g.shape == p.shape
  # Dynamic alpha makes the hidden term as large as the logit term.
  np.testing.assert_allclose(float(metrics["distill/alpha"] * metrics["distill/hidden"]),
                             float(metrics["distill/kl"]), rtol=1e-5)
  want = (metrics["distill/kl"] * 2 + 0.5 * metrics["distill/embedding"]
          + 0.1 * metrics["distill/ce"])
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)


def _run_steps(cfg, dcfg, steps, batches, proj=True):
  tp, tcfg, sp, scfg = _tiny_pair()
  if dcfg.needs_hidden:
    dcfg = dataclasses.replace(dcfg, layer_map=distill.resolve_layer_map(
        dcfg.layer_map, scfg.num_hidden_layers, tcfg.num_hidden_layers))
  opt = train.make_optimizer(cfg)
  state = train.init_state(sp, opt, distill.init_projection(jax.random.key(3), 32, 64)
                           if proj else None)
  step = jax.jit(train.make_train_step(scfg, tcfg, dcfg, cfg, opt))
  history = []
  for i in range(steps):
    state, m = step(state, tp, batches[i % len(batches)])
    history.append({k: float(v) for k, v in m.items()})
  return state, history


def test_hidden_loss_falls_during_training():
  cfg = train.TrainConfig(steps=20, lr=3e-3, min_lr=3e-3, warmup_steps=0, dtype="float32",
                          global_batch_size=4, seq_len=16)
  dcfg = DistillConfig(hidden_loss="cosine", hidden_weight=1.0, logit_weight=0.0,
                       layer_map=(1,))
  _, hist = _run_steps(cfg, dcfg, 20, [_batch(1, 1, 4)])
  first, last = hist[0]["distill/hidden"], hist[-1]["distill/hidden"]
  assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("dcfg", [
    DistillConfig(hidden_loss="nmse", hidden_weight=0.3, ce_weight=0.2, layer_map=(0,)),
    # Dynamic alpha = L_logits / L_hidden: a ratio over the global batch, not per micro-batch.
    DistillConfig(hidden_loss="cosine", embedding_weight=0.5, ce_weight=0.2, layer_map=(1,)),
], ids=["fixed_alpha", "dynamic_alpha"])
def test_gradient_accumulation_equals_one_big_batch(dcfg):
  big = _batch(2, 1, 8)
  # Micro-batch a holds rows a, a + A, ... (see train.global_batch).
  acc = jax.tree_util.tree_map(lambda x: x[0].reshape(4, 2, -1).transpose(1, 0, 2), big)
  results = []
  for micro, batch in ((None, big), (4, acc)):
    cfg = train.TrainConfig(steps=3, lr=1e-3, warmup_steps=1, dtype="float32",
                            global_batch_size=8, micro_batch_size=micro, seq_len=16)
    results.append(_run_steps(cfg, dcfg, 3, [batch]))
  (s1, h1), (s2, h2) = results
  for a, b in zip(h1, h2):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=k)
  for x, y in zip(jax.tree_util.tree_leaves(s1["params"]),
                  jax.tree_util.tree_leaves(s2["params"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_learning_rate_schedule():
  cfg = train.TrainConfig(steps=100, lr=1e-4, min_lr=1e-5, warmup_steps=40)
  lrs = np.array([float(train.learning_rate(s, cfg)) for s in range(100)])
  np.testing.assert_allclose(lrs[:40], 1e-4 * np.arange(1, 41) / 40, rtol=1e-6)
  assert lrs[40] == pytest.approx(1e-4) and lrs[99] == pytest.approx(1e-5)
  mid = 40 + (99 - 40) / 2
  assert float(train.learning_rate(mid, cfg)) == pytest.approx(5.5e-5, rel=1e-5)
  assert np.all(np.diff(lrs[40:]) <= 0)


def test_teacher_correction_step_lowers_cross_entropy():
  tp, tcfg, _, _ = _tiny_pair()
  cfg = train.TrainConfig(mode="teacher_correction", steps=10, lr=3e-3, warmup_steps=0,
                          min_lr=3e-3, dtype="bfloat16", global_batch_size=4, seq_len=16)
  opt = train.make_optimizer(cfg)
  state = train.init_state(tp, opt)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state["params"]))
  step = jax.jit(train.make_train_step(tcfg, None, None, cfg, opt))
  batch = _batch(3, 1, 4)
  ces = []
  for _ in range(10):
    state, m = step(state, None, batch)
    ces.append(float(m["train/ce"]))
  assert ces[-1] < ces[0] - 0.5 and set(m) >= {"train/loss", "train/lr", "train/grad_norm"}
  # Master weights stay float32 while the forward pass runs in bfloat16.
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state["params"]))
