"""LoRA recovery: the merge against numpy, the PEFT layout against HF's matrices, a LoRA
distillation end to end (only the adapters train, the export is base + B A alpha / r, the PEFT
adapter loads in transformers + peft and gives our logits, resume is exact), QLoRA on an INT4
base, and the settings."""

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest

from minitron_jax import axes, config, settings
from minitron_jax.distill import lora
from minitron_jax.distill.job import DistillJob, QadSpec
from minitron_jax.distill.step import TrainConfig


def _random_params(cfg, seed):
  rng = np.random.default_rng(seed)
  return axes.tree_from_leaves(
      (s, (1.0 + 0.1 * rng.standard_normal(axes.shape(s, cfg))).astype(np.float32)
       if s.path[-1].endswith("norm") else
       (0.02 * rng.standard_normal(axes.shape(s, cfg))).astype(np.float32))
      for s in axes.param_specs(cfg))


def _numpy_delta(ab, scale):
  """scale * a @ b in float64, in the leaf's layout (L, *in, *out)."""
  a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
  n, r = a.shape[0], a.shape[-1]
  m = np.einsum("lir,lro->lio", a.reshape(n, -1, r), b.reshape(n, r, -1))
  return (scale * m).reshape(a.shape[:-1] + b.shape[2:])


def _random_adapters(cfg, spec, seed):
  ad = lora.init_adapters(jax.random.key(seed), cfg, spec)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda x: 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                                ad)


def test_merge_is_base_plus_scaled_ab_and_peft_matrices_are_hf_layout():
  cfg = config.preset("tiny")
  spec = lora.LoraSpec(rank=3, alpha=5.0, targets=("q", "k", "o", "down"))
  base = _random_params(cfg, 0)
  adapters = _random_adapters(cfg, spec, 1)
  fresh = lora.init_adapters(jax.random.key(0), cfg, spec)["layers"]["q"]
  assert not np.asarray(fresh["b"]).any() and np.asarray(fresh["a"]).any()  # starts at the base
  merged = lora.merged_host(base, adapters, spec.scale)
  peft = lora.peft_tensors(adapters)
  for s, leaf in axes.iter_leaves(merged, cfg):
    target = s.path[-1] if s.stacked else None
    if target not in spec.targets:
      np.testing.assert_array_equal(leaf, axes.get(base, s), err_msg=s.name)
      continue
    want = axes.get(base, s) + _numpy_delta(adapters["layers"][target], spec.scale)
    np.testing.assert_allclose(leaf, want, rtol=1e-6, atol=1e-7, err_msg=s.name)
    for i in range(cfg.num_hidden_layers):  # HF: W[out, in] += scale * B (out, r) @ A (r, in)
      a, b = peft[lora.peft_name(target, i, "A")], peft[lora.peft_name(target, i, "B")]
      assert a.shape == (spec.rank, axes.hf_shape(s, cfg)[1])
      diff = axes.to_hf_layout(leaf[i] - axes.get(base, s)[i], s)
      np.testing.assert_allclose(diff, spec.scale * (b.astype(np.float64) @ a), atol=1e-7,
                                 err_msg=s.name)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, real_dir):
  """Tiny random HF teacher and student (SmolLM2's tokenizer, tied embeddings in neither)."""
  from helpers import make_hf_llama

  root = tmp_path_factory.mktemp("lora_models")
  _, teacher = make_hf_llama(root / "teacher", vocab=49152, hidden=64, inter=96, layers=2,
                             heads=4, kv_heads=2, max_pos=512)
  student_model, student = make_hf_llama(root / "student", vocab=49152, hidden=32, inter=48,
                                         layers=2, heads=4, kv_heads=2, max_pos=512, seed=1)
  for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if os.path.exists(os.path.join(real_dir, f)):
      shutil.copy(os.path.join(real_dir, f), teacher)
  return teacher, student, student_model


def test_lora_distillation_exports_merged_and_peft_and_resumes_exactly(hf_dirs, tmp_path):
  import torch
  from peft import PeftModel
  from safetensors.numpy import load_file

  from minitron_jax import model as M
  from minitron_jax.distill import run as trainer
  from minitron_jax.io import hf as hf_io

  teacher, student, student_model = hf_dirs
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=("q", "v", "o", "up", "down"), peft=True)
  train = TrainConfig(steps=2, global_batch_size=2, seq_len=32, lr=2e-2, warmup_steps=0,
                      dtype="float32", save_every=1, log_every=100)
  job = DistillJob(output_dir=str(tmp_path / "run"), teacher_dir=teacher, student_dir=student,
                   train=train, lora=spec)
  summary = trainer.run(job)
  assert summary["lora"]["rank"] == 4
  merged, cfg = hf_io.load_hf(tmp_path / "run" / "hf")
  base, _ = hf_io.load_hf(student)
  adapters = load_file(str(tmp_path / "run" / "peft" / lora.PEFT_WEIGHTS))
  assert max(np.abs(v).max() for k, v in adapters.items() if "lora_B" in k) > 0  # it trained
  for s, leaf in axes.iter_leaves(merged, cfg):
    if not (s.stacked and s.path[-1] in spec.targets):  # frozen: the base, bit for bit
      np.testing.assert_array_equal(leaf, axes.get(base, s), err_msg=s.name)
      continue
    for i in range(cfg.num_hidden_layers):
      a = adapters[lora.peft_name(s.path[-1], i, "A")]
      b = adapters[lora.peft_name(s.path[-1], i, "B")]
      want = axes.to_hf_layout(axes.get(base, s)[i], s) + spec.scale * (b @ a)
      np.testing.assert_allclose(axes.to_hf_layout(leaf[i], s), want, rtol=0, atol=1e-7,
                                 err_msg=s.name)

  # transformers + peft: the student with the adapter gives the merged model's logits.
  tokens = np.random.default_rng(0).integers(3, 49152, (2, 16))
  with torch.no_grad():  # (PEFT wraps the model's layers in place: the plain logits first)
    plain = student_model(torch.tensor(tokens)).logits.numpy()
    peft_model = PeftModel.from_pretrained(student_model, str(tmp_path / "run" / "peft")).eval()
    got = peft_model(torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(M.forward(merged, cfg.replace(dtype="float32"), tokens)["logits"])
  np.testing.assert_allclose(got, ours, atol=2e-4, rtol=1e-4)
  assert np.abs(plain - ours).max() > 1e-2  # the adapters matter

  # Resume: from the step-1 checkpoint, the same export bit for bit.
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "2")
  shutil.rmtree(tmp_path / "run" / "hf")
  again = trainer.run(job)
  assert again["resumed_from"] == 1
  resumed, _ = hf_io.load_hf(tmp_path / "run" / "hf")
  for s, leaf in axes.iter_leaves(resumed, cfg):
    np.testing.assert_array_equal(leaf, axes.get(merged, s), err_msg=s.name)


def test_qlora_trains_adapters_on_an_int4_base():
  """The frozen base is held as INT4 `QuantizedArray`s; the export merges the adapters into
  its dequantized weights."""
  import sys
  import tempfile

  from minitron_jax.distill import run as trainer
  from minitron_jax.quantize import formats as Q

  sys.path.insert(0, os.path.dirname(__file__))
  from test_train import tiny_problem

  tp, tcfg, sp, scfg, stream = tiny_problem()
  base, _ = Q.QuantizedBase("int4", 16)(sp, scfg, None)
  assert Q.is_quantized(base["layers"]["q"])
  spec = lora.LoraSpec(rank=2, targets=("q", "gate"))
  cfg = TrainConfig(steps=2, global_batch_size=2, seq_len=32, lr=2e-2, warmup_steps=0,
                    dtype="bfloat16", save_every=0, log_every=100)
  with tempfile.TemporaryDirectory() as out:
    res = trainer.fit(cfg, model_params=base, model_cfg=scfg, train_tokens=stream,
                      output_dir=out, teacher_params=tp, teacher_cfg=tcfg, lora=spec)
  adapters = jax.tree_util.tree_map(np.asarray, res.params)
  assert set(adapters["layers"]) == {"q", "gate"}
  assert np.abs(adapters["layers"]["q"]["b"]).max() > 0
  merged = lora.merged_host(base, adapters, spec.scale)
  for target in ("q", "gate", "k"):
    dense = np.asarray(base["layers"][target].dequantize(np.float32))
    want = dense + (_numpy_delta(adapters["layers"][target], spec.scale)
                    if target in spec.targets else 0.0)
    np.testing.assert_allclose(merged["layers"][target], want, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(dense, sp["layers"][target])  # it was quantized


JOB = DistillJob(output_dir="out", student_dir="student")


@pytest.mark.parametrize("spec,field", [
    (lora.LoraSpec(rank=0), "lora.rank"),
    (lora.LoraSpec(targets=("q", "qkv")), "lora.targets"),
    (lora.LoraSpec(targets=()), "lora.targets"),
    (lora.LoraSpec(alpha=-1.0), "lora.alpha"),
    (lora.LoraSpec(base_format="fp8"), "lora.base_format"),
    (lora.LoraSpec(group_size=1), "lora.group_size"),
])
def test_lora_settings_name_the_wrong_field(spec, field):
  with pytest.raises(settings.SettingError) as err:
    dataclasses.replace(JOB, lora=spec).validate()
  assert err.value.field == field


def test_lora_jobs_refuse_qad_and_cache_writes_and_the_recipe_names_its_keys():
  from ml_collections import ConfigDict

  from minitron_jax.distill import run as trainer
  from minitron_jax.recipe import jobs

  with pytest.raises(settings.SettingError, match="quantization-aware"):
    dataclasses.replace(JOB, lora=lora.LoraSpec(), qad=QadSpec(format="int8")).validate()
  with pytest.raises(settings.SettingError, match="teacher cache"):
    DistillJob(output_dir="o", cache_topk=8, teacher_cache="c", lora=lora.LoraSpec()).validate()
  with pytest.raises(settings.SettingError) as err:  # QLoRA without the quantization setup
    trainer.run(dataclasses.replace(JOB, lora=lora.LoraSpec(base_format="int8")))
  assert err.value.field == "lora.base_format"
  cfg = ConfigDict({"distill": {"lora_rank": 0, "lora_targets": "q,k,v,o,gate,up,down",
                                "lora_alpha": 0.0, "lora_base_format": ""}})
  assert jobs.lora_spec(cfg) is None
  cfg.distill.lora_rank, cfg.distill.lora_targets = 16, "q, v"
  assert jobs.lora_spec(cfg) == lora.LoraSpec(rank=16, targets=("q", "v"))
  with pytest.raises(settings.SettingError) as err, settings.named(jobs.distill_names("distill")):
    cfg.distill.lora_targets = "q,w"
    jobs.lora_spec(cfg).validate()
  assert str(err.value).startswith("distill.lora_targets ")
