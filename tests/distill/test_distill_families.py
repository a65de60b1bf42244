"""One distillation step (logit KL, hidden-state and embedding losses) on each family: every
student leaf (biases, q/k norms, Gemma's norms included) gets a gradient and moves."""

import dataclasses

import jax
import numpy as np
import pytest

from helpers import covering_families, family_config, family_params
from minitron_jax.distill import losses as distill
from minitron_jax.distill import step as train
from minitron_jax.distill.losses import DistillConfig
from minitron_jax.prune import importance as I, slicing


@pytest.mark.parametrize("family", covering_families("gemma3_text"))
def test_one_distillation_step_moves_every_student_leaf(family):
  tcfg = family_config(family, num_hidden_layers=2)
  tp = family_params(tcfg)
  targets = slicing.Targets(hidden_size=48, num_attention_heads=4, num_hidden_layers=1)
  plan = slicing.make_plan(tcfg, targets, I.random_scores(tcfg), layer_scores=np.array([0., 1.]))
  sp, scfg = slicing.prune(tp, tcfg, plan)
  assert scfg.sliding_layers == tcfg.sliding_layers[1:]
  dcfg = DistillConfig(hidden_loss="cosine", embedding_weight=0.5, ce_weight=0.1)
  dcfg = dataclasses.replace(dcfg, layer_map=distill.resolve_layer_map(
      plan.layers.tolist(), scfg.num_hidden_layers, tcfg.num_hidden_layers))
  cfg = train.TrainConfig(steps=2, lr=1e-2, warmup_steps=0, dtype="float32",
                          global_batch_size=2, seq_len=12)
  opt = train.make_optimizer(cfg)
  state = train.init_state(sp, opt, distill.init_projection(jax.random.key(3), 48, 64))
  tokens = np.random.default_rng(0).integers(3, tcfg.vocab_size, (2, 12)).astype(np.int32)
  batch = {"tokens": tokens[None], "segment_ids": np.ones_like(tokens)[None],  # 1 micro-batch
           "positions": np.broadcast_to(np.arange(12, dtype=np.int32), (1, 2, 12))}
  new, metrics = jax.jit(train.make_train_step(scfg, tcfg, dcfg, cfg, opt))(state, tp, batch)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert float(metrics["distill/hidden"]) > 0
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                 sp, new["params"]["model"])
  assert all(jax.tree_util.tree_leaves(moved)), moved
