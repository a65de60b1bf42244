"""The whole recipe in a few minutes on a random tiny Llama with SmolLM2's tokenizer (a smoke
test, also of a fresh install):

  python launch/minitron.py --config=configs/tiny.py

The teacher defaults to `smollm2-tiny-random` (hidden 128, MLP 256, 4 layers, 4 heads / 2 KV
heads); --config.teacher=DIR takes any model of any family with that vocabulary
(tests/recipe/test_recipe_families.py runs a Qwen2, Qwen3, Mistral and Gemma 3 one)."""

from configs import base


def get_config():
  c = base.get_config()
  c.teacher = "smollm2-tiny-random"
  c.run_dir = "runs/tiny"
  c.train_dtype = "float32"
  c.correction.update(base._train(steps=2, batch=2, seq_len=32, lr=1e-3, min_lr=1e-4, warmup=1))
  c.prune.width = dict(hidden_size=64, intermediate_size=128)
  c.prune.depth = dict(num_hidden_layers=2)
  c.prune.calib_samples = 4
  c.prune.calib_seq_len = 32
  c.prune.eval_samples = 2
  c.prune.batch_size = 2
  c.distill.update(base._train(steps=4, batch=2, seq_len=32, lr=1e-3, min_lr=1e-4, warmup=1))
  c.distill.kd_temperature = 1.0
  c.distill.hidden_loss = "none"
  c.distill.teacher_topk = 16          # the students read one cached teacher pass
  c.quantize.formats = ("fp8_channel", "int8", "int4", "gguf_q8_0", "gguf_q4_0")
  c.data.heldout_chars = 4_000
  c.baselines = True                   # every stage, as the tests check
  c.eval.tasks = ("ppl", "piqa")
  c.eval.reference_tasks = ()          # every task for every model, as the tests check
  c.eval.seq_len = 64
  c.eval.max_windows = 2
  c.eval.limit = 2
  c.eval.decode_tokens = 4
  c.eval.batch_size = 4
  c.generate.max_new_tokens = 4
  return c
