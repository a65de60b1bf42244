"""Every recipe setting with its default; recipes start from `get_config()` and override."""

from ml_collections import ConfigDict

TASKS = ["ppl", "winogrande", "piqa", "hellaswag", "arc_easy", "arc_challenge", "lambada",
         "openbookqa"]


def _train(steps, batch, seq_len, lr, min_lr, warmup):
  return ConfigDict(dict(steps=steps, global_batch_size=batch, micro_batch_size=0,
                         seq_len=seq_len, lr=lr, min_lr=min_lr, warmup_steps=warmup,
                         save_every=max(1, steps // 4), eval_every=0, eval_windows=4))


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.teacher = "smollm2-135m"          # known short name, HF directory or hub id
  c.model_preset = "smollm2-135m"     # architecture preset (minitron_jax.config.PRESETS)
  c.run_dir = "runs/default"
  c.data_root = ""                    # "" = ../shared/data beside the project
  c.dtype = "float32"                 # evaluation / importance compute dtype
  c.train_dtype = "bfloat16"          # training compute dtype (fp32 master weights)
  c.mesh = "data:-1"
  c.seed = 0

  c.data = ConfigDict()
  c.data.source = "shakespeare"       # file, directory, glob, hub name, shakespeare, synthetic
  c.data.synthetic = ConfigDict(dict(num_documents=256, max_new_tokens=192, batch_size=16,
                                     temperature=0.8, top_p=0.95))

  # Sized so the whole default recipe finishes in under 30 minutes on a 2-core CPU.
  c.correction = _train(steps=8, batch=4, seq_len=256, lr=2e-5, min_lr=2e-6, warmup=2)

  c.prune = ConfigDict()
  c.prune.kinds = ("width", "depth")  # which students to make (a tuple: overridable)
  c.prune.width = ConfigDict(dict(hidden_size=432, intermediate_size=896))
  c.prune.depth = ConfigDict(dict(num_hidden_layers=15))
  c.prune.importance = "activation"
  c.prune.aggregation = "l2,mean"
  c.prune.layer_importance = "lm_loss"
  c.prune.calib_samples = 64
  c.prune.calib_seq_len = 256
  c.prune.eval_samples = 16
  c.prune.batch_size = 8
  c.prune.layer_batches = 1           # batches per layer-removal trial (46 trials for 30 layers)

  c.distill = _train(steps=30, batch=4, seq_len=256, lr=5e-4, min_lr=5e-5, warmup=3)
  c.distill.kd_temperature = 1.0
  c.distill.hidden_loss = "none"

  c.baselines = True                  # CE-trained pruned student and random-init student

  # The depth student keeps hidden 576, a multiple of 32 as GGUF blocks need (432 is not).
  c.quantize = ConfigDict(dict(source="distill_depth",
                               formats=("fp8", "int8", "int4", "gguf_q8_0", "gguf_q4_0")))

  # Tuples, not lists: ml_collections overrides tuples from the command line.
  c.eval = ConfigDict(dict(tasks=tuple(TASKS), ppl_file="", seq_len=512, max_windows=4,
                           limit=20, batch_size=16, decode_tokens=16))
  c.generate = ConfigDict(dict(
      prompts=("What is the capital of France?",
               "Explain in two sentences why the sky is blue.",
               "Write a haiku about pruning a tree."),
      chat=True, max_new_tokens=32))
  return c
