"""Sparse exports: the sparse-24-bitmask layout decoded independently gives our logits in
transformers; every group of 4 has two zeros; the dense export loads as it is."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import make_hf_llama, torch_logits
from minitron_jax import model as M
from minitron_jax.io import hf as hf_io
from minitron_jax.sparsify import apply
from minitron_jax.sparsify import export as E
from minitron_jax.sparsify.methods import Pattern

P24 = Pattern.parse("2:4")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny") / "m"
  make_hf_llama(d, vocab=128, hidden=64, inter=96, layers=2, heads=4, kv_heads=2)
  params, cfg = hf_io.load_hf(d)[:2]
  return str(d), params, cfg


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(0).integers(3, 120, (2, 10))


def _decode_bitmask(compressed, bitmask, shape):
  """compressed-tensors' sparse-24-bitmask decompression, written from the format: unpack the
  little-endian bits of each row, scatter the row-major kept values there."""
  out, inp = (int(s) for s in np.asarray(shape).reshape(-1))
  keep = np.unpackbits(np.asarray(bitmask), axis=-1, count=inp, bitorder="little").astype(bool)
  dense = np.zeros((out, inp), np.float32)
  dense[keep] = np.asarray(compressed, np.float32).reshape(-1)
  return dense


def _densify(src, dst):
  """A plain HF directory of a sparse-24 export, decoded without our code, weights in float32."""
  import torch
  from safetensors.torch import load_file, save_file

  f = {k: (v.float() if v.is_floating_point() else v).numpy()
       for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
  tensors = {}
  for name in f:
    if name.endswith((".bitmask", ".shape", ".weight_scale")):
      continue
    if name.endswith(".compressed"):
      module = name.removesuffix(".compressed")
      w = _decode_bitmask(f[name], f[module + ".bitmask"], f[module + ".shape"])
      if module + ".weight_scale" in f:
        w = w * f[module + ".weight_scale"]
      nz = np.count_nonzero(w.reshape(w.shape[0], -1, 4), axis=-1)
      assert nz.max() <= 2, module
      tensors[module + ".weight"] = torch.from_numpy(w)
    else:
      tensors[name] = torch.from_numpy(np.asarray(f[name], np.float32))
  os.makedirs(dst)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  cfg = json.load(open(os.path.join(src, "config.json")))
  cfg.pop("quantization_config")
  cfg["torch_dtype"] = "float32"
  json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))


@pytest.mark.parametrize("name", ["sparse24", "sparse24_fp8", "sparse24_int8"])
def test_sparse24_export_decodes_to_our_logits_in_transformers(tiny, tokens, tmp_path, name):
  import transformers
  from compressed_tensors.config import Sparse24BitMaskConfig

  d, params, cfg = tiny
  sp = apply.sparsify_params(params, cfg, "magnitude", P24)
  stored = E.stored_params(sp, cfg, name, "float32")
  out = str(tmp_path / name)
  E.write_export(stored, cfg, name, P24, out, d, sparsity=0.5)
  qcfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
  sparse = Sparse24BitMaskConfig.model_validate(qcfg["sparsity_config"])
  assert (sparse.format, sparse.sparsity_structure) == ("sparse-24-bitmask", "2:4")
  assert sparse.model_dump(exclude={"registry_requires_subclass"}) == qcfg["sparsity_config"]
  assert (qcfg["format"] == "dense") == (name == "sparse24")
  if qcfg["config_groups"]:  # the W8A8 scheme parses as compressed-tensors' own config
    from compressed_tensors.quantization import QuantizationConfig
    q = QuantizationConfig.model_validate({k: v for k, v in qcfg.items()
                                           if k != "sparsity_config"})
    assert q.config_groups["group_0"].input_activations.dynamic
  _densify(out, str(tmp_path / "dense"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense")).eval()
  ours = np.asarray(M.forward(stored, cfg, jnp.asarray(tokens))["logits"])
  np.testing.assert_allclose(torch_logits(hf, tokens), ours, atol=2e-4, rtol=1e-4)


def test_bitmask_layout_matches_compressed_tensors_014(tiny):
  """With compressed-tensors <= 0.14 importable (its sparse-24 compressor was removed after),
  our tensors equal what its own compressor writes."""
  mod = pytest.importorskip("compressed_tensors.compressors.sparse_compressors."
                            "sparse_24_bitmask")
  import torch

  d, params, cfg = tiny
  w = np.asarray(apply.layer_matrices(apply.sparsify_params(params, cfg, "magnitude", P24),
                                      cfg)["down"][0], np.float32)
  theirs = mod.Sparse24BitMaskTensor.from_dense(torch.from_numpy(w)).dict("m.weight")
  compressed, bitmask = E.bitmask_compress(w)
  np.testing.assert_array_equal(theirs["m.compressed"].numpy(), compressed)
  np.testing.assert_array_equal(theirs["m.bitmask"].numpy(), bitmask)


def test_sparse24_refuses_other_patterns_and_dense_groups(tiny):
  with pytest.raises(ValueError, match="2:4 sparsity only, not 4:8"):
    E.check_export("sparse24", Pattern.parse("4:8"))
  with pytest.raises(ValueError, match="non-zeros"):
    E.bitmask_compress(np.ones((2, 8), np.float32))
