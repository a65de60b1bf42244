"""DistillJob: validated before any work, errors named by the job's fields and renamed into the
caller's vocabulary (a launch script's flags, the recipe's config keys)."""

import dataclasses

import pytest

from minitron_jax import settings
from minitron_jax.data.calib import CalibSpec
from minitron_jax.distill import run as trainer
from minitron_jax.distill.job import DistillJob, QadSpec
from minitron_jax.distill.losses import DistillConfig
from minitron_jax.distill.step import TrainConfig

JOB = DistillJob(output_dir="out", student_dir="student")


@pytest.mark.parametrize("change,field", [
    (dict(output_dir=""), "output_dir"),
    (dict(student_dir=None), "student_dir"),
    (dict(cache_topk=8), "teacher_cache"),
    (dict(cache_topk=-1), "cache_topk"),
    (dict(cache_dtype="float16"), "cache_dtype"),
    (dict(teacher_cache="cache", loss=DistillConfig(hidden_loss="cosine")), "hidden_loss"),
    (dict(teacher_cache="cache", train=TrainConfig(mode="teacher_correction")),
     "teacher_cache"),
    (dict(train=TrainConfig(mesh="data:2,data:2")), "mesh"),
    (dict(export_dtype="int8"), "export_dtype"),
    (dict(qad=QadSpec()), "qad.format"),
    (dict(qad=QadSpec(format="int8", method="nope")), "qad.method"),
    (dict(qad=QadSpec(format="int8", calib=CalibSpec(data="x"))), "qad.calib.data"),
    (dict(qad=QadSpec(format="int4", method="gptq", calib=CalibSpec(data="", samples=0))),
     "qad.calib.samples"),
    (dict(qad=QadSpec(format="int8"), export_dtype="bfloat16"), "export_dtype"),
])
def test_validate_names_the_wrong_field(change, field):
  with pytest.raises(settings.SettingError) as err:
    dataclasses.replace(JOB, **change).validate()
  assert err.value.field == field


def test_valid_jobs_pass():
  JOB.validate()
  DistillJob(output_dir="o", cache_topk=8, teacher_cache="c").validate()  # a cache write
  DistillJob(output_dir="o", train=TrainConfig(mode="teacher_correction")).validate()
  dataclasses.replace(JOB, teacher_cache="c", qad=QadSpec(format="int8")).validate()


def test_settings_errors_read_as_flags_or_config_keys():
  flags = settings.flag_names({"temperature": "--kd_temperature"})
  keys = settings.config_names({"temperature": "distill.kd_temperature"}, section="distill")
  for namer, want in ((flags, "--kd_temperature"), (keys, "distill.kd_temperature")):
    with pytest.raises(settings.SettingError) as err, settings.named(namer):
      DistillConfig(temperature=0.0)
    assert str(err.value).startswith(want + " ")
  with pytest.raises(settings.SettingError) as err, settings.named(keys):
    TrainConfig(global_batch_size=8, micro_batch_size=3)
  assert str(err.value).startswith("distill.micro_batch_size=3 ")


def test_qad_without_its_setup_is_refused_before_loading_anything():
  job = dataclasses.replace(JOB, teacher_dir="/nonexistent", qad=QadSpec(format="int8"))
  with pytest.raises(settings.SettingError) as err:
    trainer.run(job)
  assert err.value.field == "qad.format"


def test_qad_setup_checks_the_format_and_method_before_any_model():
  from minitron_jax.quantize import qad

  for spec, field in ((QadSpec(format="gguf_q4_0"), "qad.format"),
                      (QadSpec(format="nope"), "qad.format"),
                      (QadSpec(format="int8", method="awq"), "qad.method")):
    with pytest.raises(settings.SettingError) as err:
      qad.QadSetup(spec, "shakespeare")
    assert err.value.field == field
  setup = qad.QadSetup(QadSpec(format="int4", method="gptq"), "train.txt")
  assert setup.calib.data == "train.txt" and setup.calib.samples == QadSpec().calib.samples


def test_the_recipe_builds_qad_jobs_and_names_its_config_keys():
  from ml_collections import ConfigDict

  from minitron_jax.recipe import jobs

  cfg = ConfigDict({"distill": {"qad_format": "", "qad_method": ""}})
  assert jobs.qad_spec(cfg) is None
  cfg.distill.qad_format = "int8"
  assert jobs.qad_spec(cfg) == QadSpec(format="int8")
  cfg.distill.qad_method = "gptq"
  assert jobs.qad_spec(cfg).method == "gptq"
  names = jobs.distill_names("distill")
  assert (names("lr"), names("dtype"), names("qad.method")) == (
      "distill.lr", "train_dtype", "distill.qad_method")
