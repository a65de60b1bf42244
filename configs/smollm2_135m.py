"""Default recipe: the real SmolLM2-135M-Instruct teacher, sized for a 2-core CPU.

  python launch/minitron.py --config=configs/smollm2_135m.py --config.eval.limit=100
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.teacher = "smollm2-135m"          # known short name, HF directory or hub id
  c.model_preset = "smollm2-135m"     # architecture preset (minitron_jax.config.PRESETS)
  c.run_dir = "runs/smollm2-135m"
  c.data_root = ""                    # "" = ../shared/data beside the project
  c.dtype = "float32"

  c.eval = ConfigDict()
  c.eval.tasks = ["ppl", "winogrande", "piqa", "hellaswag", "arc_easy", "arc_challenge",
                  "lambada", "openbookqa"]
  c.eval.ppl_file = ""                # "" = <data_root>/wikitext-2/test.txt
  c.eval.seq_len = 1024
  c.eval.max_windows = 32
  c.eval.limit = 200                  # examples per zero-shot task
  c.eval.batch_size = 16

  c.generate = ConfigDict()
  c.generate.prompts = ["What is the capital of France?",
                        "Explain in two sentences why the sky is blue.",
                        "Write a haiku about pruning a tree."]
  c.generate.chat = True
  c.generate.max_new_tokens = 64

  # Pruning targets: about half the non-embedding parameters, by width and by depth.
  # hidden 432 = 9 x 48 keeps hidden_size divisible by the head count, which transformers 5
  # requires of Llama configs even when head_dim is explicit.
  c.prune = ConfigDict()
  c.prune.width = ConfigDict(dict(hidden_size=432, intermediate_size=896,
                                  num_attention_heads=9, num_key_value_heads=3))
  c.prune.depth = ConfigDict(dict(num_hidden_layers=15))
  return c
