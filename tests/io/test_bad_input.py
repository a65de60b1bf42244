"""Bad checkpoints and configs are refused with a message naming the culprit."""

import os
import shutil

import numpy as np
import pytest

from helpers import make_hf_llama
from minitron_jax import config as C
from minitron_jax.io import files
from minitron_jax.io import hf as hf_io
from minitron_jax.io import safetensors as st


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  _, d = make_hf_llama(tmp_path_factory.mktemp("hf") / "m")
  return d


def _copy(src, tmp_path):
  dst = tmp_path / "m"
  shutil.copytree(src, dst)
  return dst


def _edit_config(d, **kw):
  p = os.path.join(d, "config.json")
  cfg = files.read_json(p)
  cfg.update(kw)
  files.write_json(p, cfg)


def test_missing_config(hf_dir, tmp_path):
  d = _copy(hf_dir, tmp_path)
  os.remove(d / "config.json")
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_io.load_hf(d)


def test_truncated_safetensors(hf_dir, tmp_path):
  d = _copy(hf_dir, tmp_path)
  p = d / "model.safetensors"
  data = p.read_bytes()
  p.write_bytes(data[: len(data) - 1000])
  with pytest.raises(st.SafetensorsError, match="truncated.*tensor"):
    hf_io.load_hf(d)


def test_tensor_shape_disagrees_with_config(hf_dir, tmp_path):
  d = _copy(hf_dir, tmp_path)
  _edit_config(d, intermediate_size=100)
  with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight.*shape"):
    hf_io.load_hf(d)


@pytest.mark.parametrize("edit,pattern", [
    (dict(model_type="phi3"), "model_type 'phi3'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(sliding_window=4096), "sliding_window"),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "longrope"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
])
def test_unsupported_config(hf_dir, tmp_path, edit, pattern):
  d = _copy(hf_dir, tmp_path)
  _edit_config(d, **edit)
  with pytest.raises(C.ConfigError, match=pattern) as e:
    hf_io.load_hf(d)
  assert "config.json" in str(e.value)


def test_bias_tensor_refused(hf_dir, tmp_path):
  d = _copy(hf_dir, tmp_path)
  f = st.SafetensorsFile(d / "model.safetensors")
  tensors = [(n, f.shape(n), f.dtype(n), lambda n=n: np.array(f.get(n))) for n in f.keys()]
  tensors.append(("model.layers.0.self_attn.q_proj.bias", (64,), np.dtype(np.float32),
                  lambda: np.zeros(64, np.float32)))
  st.write(d / "new.safetensors", tensors)
  os.replace(d / "new.safetensors", d / "model.safetensors")
  with pytest.raises(hf_io.CheckpointError, match="q_proj.bias"):
    hf_io.load_hf(d)


def test_missing_tensor_and_pickle_only(hf_dir, tmp_path):
  d = _copy(hf_dir, tmp_path)
  f = st.SafetensorsFile(d / "model.safetensors")
  keep = [n for n in f.keys() if n != "model.norm.weight"]
  st.write(d / "new.safetensors", [(n, f.shape(n), f.dtype(n), lambda n=n: np.array(f.get(n)))
                                   for n in keep])
  os.replace(d / "new.safetensors", d / "model.safetensors")
  with pytest.raises(hf_io.CheckpointError, match="model.norm.weight is missing"):
    hf_io.load_hf(d)
  os.remove(d / "model.safetensors")
  (d / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(hf_io.CheckpointError, match="never unpickled"):
    hf_io.load_hf(d)


def test_failed_save_leaves_no_directory(hf_dir, tmp_path):
  params, cfg = hf_io.load_hf(hf_dir)
  bad_cfg = cfg.replace(intermediate_size=cfg.intermediate_size + 1)  # disagrees with params
  out = tmp_path / "out"
  with pytest.raises(Exception):
    hf_io.save_hf(params, bad_cfg, out)
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]
  hf_io.save_hf(params, cfg, out)
  with pytest.raises(FileExistsError, match="not empty"):
    hf_io.save_hf(params, cfg, out)
