"""Llama-3.1-8B -> Llama-3.1-Minitron-4B-Width (hidden 4096->3072, MLP 14336->9216; heads and
layers kept), the published width-pruned setting. Meant for accelerators."""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.teacher = "meta-llama/Llama-3.1-8B"
  c.model_preset = "llama3.1-8b"
  c.run_dir = "runs/llama3.1-minitron-4b-width"
  c.data_root = ""
  c.dtype = "bfloat16"

  c.eval = ConfigDict()
  c.eval.tasks = ["ppl", "winogrande", "piqa", "hellaswag", "arc_easy", "arc_challenge",
                  "lambada", "openbookqa"]
  c.eval.ppl_file = ""
  c.eval.seq_len = 4096
  c.eval.max_windows = 0              # 0 = all
  c.eval.limit = 0                    # 0 = all
  c.eval.batch_size = 8

  c.generate = ConfigDict()
  c.generate.prompts = ["The theory of relativity states that",
                        "Write a short poem about compression."]
  c.generate.chat = False
  c.generate.max_new_tokens = 128

  c.prune = ConfigDict()
  c.prune.width = ConfigDict(dict(hidden_size=3072, intermediate_size=9216,
                                  num_attention_heads=32, num_key_value_heads=8))
  c.prune.depth = None
  return c
