"""Default recipe: the real SmolLM2-135M-Instruct teacher, sized for a 2-core CPU (~29 min).

Each student keeps about half of the teacher's non-embedding parameters: by width (MLP
1536 -> 480 in every layer; hidden, heads and layers kept) or by depth (30 -> 15 layers, the
contiguous block whose removal raises the LM loss least). A width target that also cuts the
hidden size must keep it divisible by the head count (e.g. 432 = 9 x 48), which transformers 5
demands of Llama configs even with an explicit head_dim.

  python launch/minitron.py --config=configs/smollm2_135m.py --config.eval.limit=50
"""

from configs import base


def get_config():
  c = base.get_config()
  c.run_dir = "runs/smollm2-135m"
  return c
