"""Llama-3.1-8B -> Llama-3.1-Minitron-4B-Width (hidden 4096->3072, MLP 14336->9216; heads and
layers kept), with the published distillation settings (lr 1e-4 -> 1e-5 cosine, 40 warmup
steps, batch 1152 x 8192 tokens, forward KL on logits only). Meant for accelerator pods."""

from configs import base


def get_config():
  c = base.get_config()
  c.teacher = "meta-llama/Llama-3.1-8B"
  c.run_dir = "runs/llama3.1-minitron-4b-width"
  c.dtype = "bfloat16"
  c.train_dtype = "bfloat16"  # bf16 compute, float32 master weights and Adam moments
  # The settings `benchmarks/aot_pod.py` compiled for a v5p-64 slice (32 chips): every stage
  # sharded over one FSDP axis, one 8192-token row per chip per micro-batch, layers
  # rematerialised. On a v5e-256 (16 GiB chips): --config.mesh=fsdp:-1,tensor:8
  # (docs/pod-scale.md).
  c.mesh = "fsdp:-1"
  c.data.source = ("path/to/distillation/corpus",)  # e.g. a Nemotron-CC style jsonl directory
  c.correction.update(base._train(steps=200, batch=1152, seq_len=8192, lr=1e-5, min_lr=1e-6,
                             warmup=20))
  c.correction.micro_batch_size = 32
  c.correction.remat = True
  c.prune.kinds = ("width",)
  c.prune.width = dict(hidden_size=3072, intermediate_size=9216)
  c.prune.calib_samples = 1024
  c.prune.calib_seq_len = 4096
  c.distill.update(base._train(steps=14_000, batch=1152, seq_len=8192, lr=1e-4, min_lr=1e-5,
                          warmup=40))
  c.distill.micro_batch_size = 32
  c.distill.remat = True
  c.distill.kd_temperature = 1.0
  c.distill.hidden_loss = "none"
  c.baselines = False
  c.quantize.source = "distill_width"
  c.quantize.formats = ("fp8",)
  c.eval.tasks = tuple(base.TASKS)  # every task, all examples
  c.eval.seq_len = 4096
  c.eval.max_windows = 0
  c.eval.limit = 0
  c.eval.batch_size = 8
  c.generate.chat = False
  c.generate.max_new_tokens = 128
  return c
