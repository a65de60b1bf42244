"""Llama-3.1-8B -> Llama-3.1-Minitron-4B-Depth: layers 16-31 dropped (32 -> 16), the published
depth-pruned setting. Meant for accelerators."""

from configs import llama31_8b_to_4b_width as _width  # same teacher, data and evaluation


def get_config():
  c = _width.get_config()
  c.run_dir = "runs/llama3.1-minitron-4b-depth"
  c.prune.width = None
  c.prune.depth = dict(drop_layers="16-31")
  return c
