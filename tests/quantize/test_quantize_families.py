"""Quantization of each family (Qwen2, Qwen3, Mistral, Gemma 3): AWQ's folding into (1 + w)
norms and into v's bias is exact in float, and every format runs on every family."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import covering_families, family_config, family_params
from minitron_jax import axes, model as M
from minitron_jax.quantize import awq, calibrate
from minitron_jax.quantize import formats as Q


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _tokens(cfg, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 12)))


@pytest.mark.parametrize("family", covering_families())
def test_awq_folding_into_biases_and_plus_one_norms_is_exact(family):
  """MHA, so v's rows (and Qwen2's v bias) take the o scales too."""
  cfg = family_config(family, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2)
  params = family_params(cfg)
  rng = np.random.default_rng(0)
  widths = {"attn_in": cfg.hidden_size, "mlp_in": cfg.hidden_size,
            "mlp_act": cfg.intermediate_size, "attn_heads": cfg.num_attention_heads * cfg.head_dim}
  scales = {t: rng.lognormal(0, 0.7, (2, widths[t])) for t in awq.scale_groups(4, 4)}
  folded = awq.fold_params(params, cfg, scales)
  changed = ["attn_norm", "mlp_norm", "v"] + (["v_bias"] if cfg.attention_bias else [])
  for name in changed:
    assert not np.allclose(folded["layers"][name], params["layers"][name]), name
  want = np.asarray(M.forward(params, cfg, _tokens(cfg))["logits"])
  assert _rel(np.asarray(M.forward(folded, cfg, _tokens(cfg))["logits"]), want) <= 1e-5


def test_awq_calibration_runs_on_sliding_and_global_layers():
  cfg = family_config("gemma3_text", num_hidden_layers=2)
  params = family_params(cfg)
  batches = [np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))]
  qp = calibrate.calibrated_params(params, cfg, Q.QuantFormat.INT4_GROUP, batches, "awq",
                                   group_size=32)
  want = np.asarray(M.forward(params, cfg, _tokens(cfg))["logits"])
  assert _rel(np.asarray(M.forward(qp, cfg, _tokens(cfg))["logits"]), want) < 0.5


# By default the covering families run every other format between them (one of each kind:
# FP8, INT8, INT4 and GGUF); MINITRON_JAX_ALL_FAMILIES=1 runs every format on every family.
ALL = bool(os.environ.get("MINITRON_JAX_ALL_FAMILIES"))


@pytest.mark.parametrize("family", covering_families())
def test_every_format_runs_on_every_family(family):
  cfg = family_config(family, num_hidden_layers=2)
  params = family_params(cfg)
  fwd = jax.jit(lambda p: M.forward(p, cfg, _tokens(cfg))["logits"])
  want = np.asarray(fwd(params))
  i = covering_families().index(family)
  for fmt in list(Q.QuantFormat) if ALL else list(Q.QuantFormat)[i::4]:
    qp = Q.quantize_params(params, cfg, fmt, group_size=32)
    for spec, leaf in axes.iter_leaves(qp, cfg):  # biases and norms stay as they were
      assert Q.is_quantized(leaf) == Q.is_quantizable(spec), (fmt, spec.name)
    assert _rel(np.asarray(fwd(qp)), want) < 0.5, fmt
