"""Masked distillation: the zeros of a sparse student stay zero through training and export,
Adam's moments of masked entries stay zero."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from minitron_jax.distill import masked
from minitron_jax.sparsify import apply
from minitron_jax.sparsify.methods import Pattern

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "distill"))


def _tree(rng):
  w = rng.standard_normal((2, 8, 12)).astype(np.float32)
  w[:, :, ::2] = 0.0
  return {"model": {"layers": {"up": jnp.asarray(w),
                               "mlp_norm": jnp.ones((2, 8), jnp.float32)},
                    "embed": jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)}}


def test_keep_zeros_masks_gradients_moments_and_updates():
  rng = np.random.default_rng(0)
  params = _tree(rng)
  inner = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(1e-2, weight_decay=0.1))
  tx = masked.keep_zeros(inner)
  ref_params, ref_state = params, inner.init(params)
  state = tx.init(params)
  keep = np.asarray(params["model"]["layers"]["up"]) != 0
  for _ in range(3):
    grads = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    # Reference: the unwrapped optimizer on gradients zeroed by hand at the masked entries.
    g = dict(grads["model"]["layers"], up=grads["model"]["layers"]["up"] * keep)
    ref_grads = {"model": {**grads["model"], "layers": g}}
    ref_updates, ref_state = inner.update(ref_grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, ref_updates)
  up = np.asarray(params["model"]["layers"]["up"])
  assert np.all(up[~keep] == 0) and np.all(up[keep] != 0)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         params, ref_params)
  adam = state[1][0]
  for moment in (adam.mu, adam.nu):
    assert np.all(np.asarray(moment["model"]["layers"]["up"])[~keep] == 0)
  assert not np.array_equal(np.asarray(params["model"]["embed"]),
                            np.asarray(_tree(np.random.default_rng(0))["model"]["embed"]))


def _groups_ok(params, cfg):
  for name, m in apply.layer_matrices(params, cfg).items():
    nz = np.count_nonzero(m.reshape(*m.shape[:-1], -1, 4), axis=-1)
    if nz.max() > 2:
      return False
  return True


def test_masked_distillation_keeps_every_group_of_four_two_zeros(tmp_path):
  from test_train import tiny_problem

  from minitron_jax.distill import losses as distill
  from minitron_jax.distill import run as trainer
  from minitron_jax.distill.step import TrainConfig
  from minitron_jax.io import hf as hf_io
  from minitron_jax.sparsify import export as sparse_export

  tp, tcfg, sp, scfg, stream = tiny_problem()
  p24 = Pattern.parse("2:4")
  sp = apply.sparsify_params(sp, scfg, "magnitude", p24)
  assert _groups_ok(sp, scfg)
  results = {}
  for keep in (True, False):
    cfg = TrainConfig(steps=3, global_batch_size=4, seq_len=32, lr=1e-2, warmup_steps=1,
                      dtype="float32", save_every=0, log_every=1, keep_sparsity=keep)
    results[keep] = trainer.fit(cfg, model_params=sp, model_cfg=scfg, train_tokens=stream,
                                output_dir=str(tmp_path / str(keep)), teacher_params=tp,
                                teacher_cfg=tcfg, dcfg=distill.DistillConfig(),
                                log=lambda s: None).params
  trained = jax.tree_util.tree_map(np.asarray, results[True])
  assert not np.array_equal(trained["layers"]["up"], np.asarray(sp["layers"]["up"]))
  assert _groups_ok(trained, scfg)
  assert not _groups_ok(jax.tree_util.tree_map(np.asarray, results[False]), scfg)
  out = str(tmp_path / "export")
  stored = sparse_export.stored_params(trained, scfg, "dense", "bfloat16")
  sparse_export.write_export(stored, scfg, "dense", p24, out, None, sparsity=0.5)
  assert _groups_ok(hf_io.load_hf(out)[0], scfg)
