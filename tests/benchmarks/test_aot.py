"""Compiling for a TPU slice without a TPU: a scaled-down distillation step on a 4-chip v5p.

Needs libtpu (`pip install "jax[tpu]==<installed jax>"`, part of the test extra); it only
describes the topology and compiles, nothing runs on a TPU.
"""

import os

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from minitron_jax import config, sharding  # noqa: E402
from benchmarks import aot  # noqa: E402

pytestmark = pytest.mark.skipif(not aot.libtpu_available(),
                                reason='libtpu is not installed (pip install "jax[tpu]")')


def test_topology_names():
  chip, name, chips = aot.parse_topology("v5p-64")  # Cloud names count TensorCores
  assert (chip.name, name, chips) == ("TPU v5p", "v5p:2x4x4", 32)
  assert aot.parse_topology("v5e-256")[1:] == ("v5e:16x16", 256)
  assert aot.parse_topology("v5p:2x2x1")[2] == 4
  with pytest.raises(ValueError, match="v5p-63"):
    aot.parse_topology("v5p-63")


def test_scaled_down_distill_step_compiles_with_sane_memory():
  teacher = config.preset("llama3.1-8b").replace(
      num_hidden_layers=4, hidden_size=1024, intermediate_size=3584, num_attention_heads=8,
      num_key_value_heads=4, vocab_size=32000)
  student = teacher.replace(hidden_size=768, intermediate_size=2048)
  chip, devices = aot.topology_devices("v5p:2x2x1")
  assert len(devices) == 4 and "v5" in devices[0].device_kind.lower()
  mesh = sharding.make_mesh("fsdp:-1", devices)
  plan = aot.DistillPlan(micro_batch_size=4, accum_steps=2, seq_len=2048, remat=True)
  compiled = aot.lower_distill(student, teacher, mesh, plan)
  mem = aot.memory(compiled)
  # Attention runs in the splash kernels, whose FLOPs XLA's cost analysis does not count.
  assert aot.kernel_calls(compiled)
  # Every parameter has an `embed` axis, sharded over fsdp: each chip holds a quarter of the
  # float32 student with its two Adam moments, of the bf16 teacher and of the batch.
  total = (3 * 4 * student.num_params() + 2 * teacher.num_params()
           + 3 * 4 * plan.accum_steps * plan.micro_batch_size * plan.seq_len)
  assert abs(mem.arguments - total / 4) <= 0.02 * total / 4, (mem.arguments, total / 4)
  # The state is donated: its outputs reuse the argument buffers.
  assert mem.aliased >= 0.95 * 3 * 4 * student.num_params() / 4
  assert 0 < mem.temporaries < chip.hbm_bytes and mem.peak < chip.hbm_bytes


@pytest.mark.skipif(not os.environ.get("MINITRON_JAX_ALL_FAMILIES"),
                    reason="a minute of compiling: set MINITRON_JAX_ALL_FAMILIES=1")
def test_scaled_down_qwen3_distill_step_compiles():
  """q/k norms (head_dim-sized, replicated) and a tied embedding under FSDP."""
  teacher = config.preset("qwen3-0.6b").replace(
      num_hidden_layers=2, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
      num_key_value_heads=4, vocab_size=32000)
  student = teacher.replace(hidden_size=384, intermediate_size=768)
  _, devices = aot.topology_devices("v5p:2x2x1")
  mesh = sharding.make_mesh("fsdp:-1", devices)
  plan = aot.DistillPlan(micro_batch_size=4, accum_steps=1, seq_len=512, remat=True)
  compiled = aot.lower_distill(student, teacher, mesh, plan)
  assert aot.kernel_calls(compiled) and aot.memory(compiled).peak > 0
