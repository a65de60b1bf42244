"""Llama-3.1-8B -> Llama-3.1-Minitron-4B-Depth: layers 16-31 dropped (32 -> 16), the published
depth-pruned setting, distilled like the width student. Meant for accelerator pods."""

from configs import llama31_8b_to_4b_width as _width


def get_config():
  c = _width.get_config()
  c.run_dir = "runs/llama3.1-minitron-4b-depth"
  c.prune.kinds = ("depth",)
  c.prune.depth = dict(drop_layers="16-31")
  c.quantize.source = "distill_depth"
  return c
